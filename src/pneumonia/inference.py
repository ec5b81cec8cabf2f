"""`pneumonia predict`: prediction on image files with a pneumonia.classifier.Classifier (the
preprocessing of training, the model's probability of pneumonia, the label at the decision threshold
of the model's run), Grad-CAM overlays, and the results as a table, CSV or JSON.
"""

import csv
import io
import json
import logging
import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from itertools import islice
from pathlib import Path

import numpy as np

from pneumonia import CLASS_NAMES, atomic
from pneumonia.classifier import BATCH_SIZE, Classifier
from pneumonia.data.layout import in_folder
from pneumonia.errors import PipelineError
from pneumonia.evaluation.calibration import UNCALIBRATED, Calibration
from pneumonia.models.augmentation import TEST_TIME_VIEWS
from pneumonia.threshold_rule import DEFAULT_THRESHOLD

log = logging.getLogger(__name__)

PROGRESS_AFTER = 5  # seconds of predicting before a progress bar is shown


@dataclass(frozen=True)
class FilePrediction:
    file: str
    probability: float | None = None
    label: str | None = None
    error: str | None = None  # why the file could not be predicted (then no probability)


FIELDS = [field.name for field in fields(FilePrediction)]


def image_files(paths: Sequence[Path]) -> list[Path]:
    """Files as given (whatever their name); folders searched recursively for JPEG, PNG and DICOM files
    (DICOM by name or by content)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            is_image = in_folder(path)
            found += sorted(file for file in path.rglob("*")
                            if file.is_file() and is_image(file.relative_to(path).as_posix()))
        else:
            found.append(path)
    if not found:
        raise PipelineError(f"no JPEG, PNG or DICOM files in {', '.join(map(str, paths))}: "
                            "name image files or folders")
    return found


def predict_files(classifier: Classifier, files: Sequence[Path], workers: int | None = None) -> list[FilePrediction]:
    """One prediction per file, in order; a file that is not a readable image gets an error instead.

    `workers` threads (default: one a core) decode and resize the files, up to two batches ahead
    of the model, so that decoding runs in parallel and alongside the forward pass.
    """
    from tqdm import tqdm

    results: list[FilePrediction] = []
    inputs = _preprocessed(classifier, files, workers or os.cpu_count() or 1)
    # shown only once a run has taken PROGRESS_AFTER seconds: a few images print their table and nothing else
    progress = tqdm(total=len(files), desc="predicting", unit="img", mininterval=2, delay=PROGRESS_AFTER,
                    file=sys.stderr)
    while chunk := list(islice(inputs, BATCH_SIZE)):
        probabilities = iter(classifier.probabilities([image for _, image, _ in chunk if image is not None]))
        for file, image, error in chunk:
            if image is None:
                results.append(FilePrediction(str(file), error=error))
            else:
                probability = float(next(probabilities))
                results.append(FilePrediction(str(file), probability, classifier.label(probability)))
        progress.update(len(chunk))
    progress.close()
    return results


def _preprocessed(classifier: Classifier, files: Sequence[Path],
                  workers: int) -> Iterator[tuple[Path, np.ndarray | None, str | None]]:
    """(file, model input, None) or (file, None, why not) per file, in order, from a pool of threads
    (PIL and TensorFlow release the GIL while decoding) kept at most 2 * BATCH_SIZE files ahead."""

    def preprocess(file: Path) -> tuple[Path, np.ndarray | None, str | None]:
        try:
            return file, classifier.preprocess(file), None
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "not a readable image"
            return file, None, f"not a readable image ({type(exc).__name__}: {exc})"

    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        for file in files:
            pending.append(pool.submit(preprocess, file))
            if len(pending) > 2 * BATCH_SIZE:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_gradcam(classifier: Classifier, results: Sequence[FilePrediction], folder: Path) -> list[Path]:
    """For each predicted file, its image with the Grad-CAM map of the predicted class laid over it,
    as folder/<file name>.gradcam.png (the same overlay as the evaluation report's image grid)."""
    from pneumonia.evaluation.gradcam import heatmaps

    predicted = [result for result in results if result.error is None]
    written: list[Path] = []
    for start in range(0, len(predicted), BATCH_SIZE):
        chunk = predicted[start:start + BATCH_SIZE]
        images = np.stack([classifier.preprocess(result.file) for result in chunk])
        maps = heatmaps(classifier.model, images, np.array([CLASS_NAMES.index(result.label) for result in chunk]))
        for result, image, heatmap in zip(chunk, images, maps):
            path = folder / f"{Path(result.file).name}.gradcam.png"
            if path in written:  # same name in two folders
                path = folder / f"{Path(result.file).name}.{len(written)}.gradcam.png"
            _overlay_png(image, heatmap, f"{result.label}\np(pneumonia) = {result.probability:.2f}", path)
            written.append(path)
    return written


def _overlay_png(image: np.ndarray, heatmap: np.ndarray, caption: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(3, 3.3))
    ax.imshow(image)
    ax.imshow(heatmap, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    ax.set_title(caption, fontsize=9)
    ax.axis("off")
    with atomic.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def run_threshold(metrics: Path) -> float:
    """The decision threshold the evaluate stage chose (key "threshold" of metrics/evaluation.json), or 0.5
    with a warning."""
    try:
        threshold = float(json.loads(metrics.read_text())["threshold"])
    except (FileNotFoundError, KeyError):
        log.warning("no decision threshold in %s (run the evaluate stage): using %.2f", metrics, DEFAULT_THRESHOLD)
        return DEFAULT_THRESHOLD
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise PipelineError(f"{metrics} is not the evaluate stage's metrics ({exc}): rerun `dvc repro`") from None
    if not 0 <= threshold <= 1:  # NaN too: every image would be NORMAL
        raise PipelineError(f"{metrics} has threshold {threshold}, not a probability from 0 to 1: rerun the "
                            "evaluate stage (`dvc repro`) or restore the file (`git checkout`)")
    return threshold


def run_calibration(scores: Path) -> Calibration:
    """The calibration the evaluate stage fitted on validation (key "calibration" of reports/evaluation/test.json,
    evaluate.calibration), which its threshold is a threshold on; none when it says none."""
    try:
        values = json.loads(scores.read_text()).get("calibration")
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return UNCALIBRATED  # run_threshold says what is wrong with the file
    try:
        return Calibration.from_dict(values)
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"{scores} has calibration {values!r} ({exc}): rerun the evaluate stage (`dvc repro`) "
                            "or restore the file (`git checkout`)") from None


def run_tta_views(metrics: Path) -> int:
    """The test-time views the evaluate stage predicted with (key "tta_views" of metrics/evaluation.json,
    evaluate.tta_views), which its threshold was chosen for; 1 (the image itself) when it says none."""
    try:
        views = json.loads(metrics.read_text()).get("tta_views", 1)
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return 1  # run_threshold says what is wrong with the file
    if views not in TEST_TIME_VIEWS:
        raise PipelineError(f"{metrics} has tta_views {views!r}, not one of {sorted(TEST_TIME_VIEWS)}: rerun the "
                            "evaluate stage (`dvc repro`) or restore the file (`git checkout`)")
    return views


def table(results: Sequence[FilePrediction]) -> str:
    """Aligned text: file, probability, label; a failed file's line says why instead."""
    width = max(len("file"), *(len(result.file) for result in results))
    lines = [f"{'file':<{width}}  probability  label"]
    for result in results:
        if result.error:
            lines.append(f"{result.file:<{width}}  error: {result.error}")
        else:
            lines.append(f"{result.file:<{width}}  {result.probability:>11.4f}  {result.label}")
    return "\n".join(lines)


def write_predictions_csv(path: Path, results: Sequence[FilePrediction]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # quotes commas in file names and errors
    writer.writerow(FIELDS)
    writer.writerows([getattr(result, field) for field in FIELDS] for result in results)
    atomic.write_text(path, buffer.getvalue())


def write_predictions_json(path: Path, results: Sequence[FilePrediction]) -> None:
    atomic.write_text(path, json.dumps([asdict(result) for result in results], indent=2) + "\n")
