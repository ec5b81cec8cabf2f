"""`pneumonia predict`: prediction on image files with a pneumonia.classifier.Classifier (the
preprocessing of training, the model's probability of pneumonia, the label at the decision threshold
of the model's run, the out-of-distribution score and flag, the input checks' reasons), Grad-CAM
overlays, and the results as a table, CSV or JSON.
"""

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
from pneumonia.classifier import IMAGES_PER_PASS, Classifier, Predicted
from pneumonia.data.input_checks import OutsideIntendedUse
from pneumonia.data.layout import IMAGE_KINDS, in_folder, is_macos_litter
from pneumonia.errors import PipelineError

PROGRESS_AFTER = 5  # seconds of predicting before a progress bar is shown
OUT_OF_DISTRIBUTION = "out of distribution: unlike the training X-rays"
# A flipped export, a film scanned from the back, or a heart on the right (dextrocardia): docs/reliability.md
MIRRORED = "mirrored: left and right look swapped; check how the image was exported"
# Blur reads as opacity to the model; an enlarged thumbnail or a screenshot is blurred (docs/reliability.md)
BLURRED = "blurred: less fine detail than the training X-rays; use the original image, not an enlarged copy"
NOISY = "noisy: more fine-grained noise than the training X-rays"


@dataclass(frozen=True)
class FilePrediction:
    file: str
    probability: float | None = None
    label: str | None = None
    ood_score: float | None = None  # how unlike the training X-rays (pneumonia.ood); None without a reference
    out_of_distribution: bool | None = None  # ood_score above the model's threshold: the label is not to be trusted
    mirrored: bool | None = None  # the mirror check's flag: left and right look swapped; None without the check
    blurred: bool | None = None  # the detail check's flags: less or more fine detail than the training X-rays;
    noisy: bool | None = None  # None without the check
    flags: str = ""  # why to read it with care ("; "-separated): DICOM header checks, OOD, mirror and detail checks
    error: str | None = None  # why the file could not be predicted (then no probability)


FIELDS = [field.name for field in fields(FilePrediction)]


def image_files(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(the files to predict, the files of the folders left out). Files as given (whatever their name); folders
    searched recursively for JPEG, PNG, TIFF and DICOM files (DICOM by name or by content); what else they hold
    is left out, and macOS litter (`._*` files named like images, `__MACOSX/`) and hidden files skipped."""
    found: list[Path] = []
    left_out: list[Path] = []
    for path in paths:
        if path.is_dir():
            is_image = in_folder(path)
            for file in sorted(file for file in path.rglob("*") if file.is_file()):
                name = file.relative_to(path).as_posix()
                if is_macos_litter(name):  # AppleDouble "._x.png" files are named like images: not tried
                    continue
                if is_image(name):
                    found.append(file)
                elif not file.name.startswith("."):
                    left_out.append(file)
        else:
            found.append(path)
    if not found:
        raise PipelineError(f"no {IMAGE_KINDS} files in {', '.join(map(str, paths))}: name image files or folders"
                            + (f" ({len(left_out)} other file(s) there, e.g. {left_out[0].name}: convert them, or "
                               "name a file to try it as it is)" if left_out else ""))
    return found, left_out


def say_left_out(left_out: Sequence[Path]) -> None:
    """On stderr: the files of the folders that are not predicted, so none is missed unawares."""
    if left_out:
        print(f"{len(left_out)} file(s) in the folders left out, not {IMAGE_KINDS} by name or content: "
              f"{', '.join(map(str, left_out[:5]))}{', ...' if len(left_out) > 5 else ''} (convert them, or name a "
              "file to try it as it is)", file=sys.stderr)


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
    while chunk := list(islice(inputs, IMAGES_PER_PASS)):
        predicted = classifier.predict([image for _, image, _ in chunk if not isinstance(image, str)])
        scored = 0
        for file, image, reasons in chunk:
            if isinstance(image, str):
                results.append(FilePrediction(str(file), error=image))
            else:
                results.append(prediction(classifier, str(file), predicted, scored, reasons))
                scored += 1
        progress.update(len(chunk))
    progress.close()
    return results


def prediction(classifier: Classifier, file: str, predicted: Predicted, index: int,
               reasons: Sequence[str]) -> FilePrediction:
    """Image `index` of `predicted` with its flags: the input checks' `reasons`, then the OOD flag's, the mirror
    check's and the detail check's."""
    probability, ood_score = float(predicted.probabilities[index]), float(predicted.ood_scores[index])
    mirrored, blurred, noisy = (bool(found[index]) for found in (predicted.mirrored, predicted.blurred,
                                                                   predicted.noisy))
    reference = classifier.ood
    outside = classifier.out_of_distribution(ood_score)
    flags = [*reasons, *([OUT_OF_DISTRIBUTION] if outside else []), *([MIRRORED] if mirrored else []),
             *([BLURRED] if blurred else []), *([NOISY] if noisy else [])]
    without_detail = reference is None or reference.detail is None
    return FilePrediction(file, probability, classifier.label(probability),
                          None if reference is None else round(ood_score, 4), None if reference is None else outside,
                          None if reference is None or reference.mirror is None else mirrored,
                          None if without_detail else blurred, None if without_detail else noisy, "; ".join(flags))


def _preprocessed(classifier: Classifier, files: Sequence[Path],
                  workers: int) -> Iterator[tuple[Path, np.ndarray | str, list[str]]]:
    """(file, model input, input-check reasons) or (file, why not, []) per file, in order, from a pool of
    threads (PIL and TensorFlow release the GIL while decoding) kept at most 2 * IMAGES_PER_PASS files ahead."""

    def preprocess(file: Path) -> tuple[Path, np.ndarray | str, list[str]]:
        try:
            reasons = classifier.flags(file)
        except OutsideIntendedUse as exc:
            return file, str(exc), []
        try:
            return file, classifier.preprocess(file), reasons
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "not a readable image"
            return file, f"not a readable image ({type(exc).__name__}: {exc})", []

    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        for file in files:
            pending.append(pool.submit(preprocess, file))
            if len(pending) > 2 * IMAGES_PER_PASS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_gradcam(classifier: Classifier, results: Sequence[FilePrediction], folder: Path) -> list[Path]:
    """For each predicted file, its image with the Grad-CAM map of the predicted class laid over it,
    as folder/<file name>.gradcam.png (the same overlay as the evaluation report's image grid)."""
    from pneumonia.evaluation.gradcam import heatmaps

    predicted = [result for result in results if result.error is None]
    written: list[Path] = []
    for start in range(0, len(predicted), IMAGES_PER_PASS):
        chunk = predicted[start:start + IMAGES_PER_PASS]
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
    from pneumonia.plotting import plt, save_png  # here: matplotlib loads only when maps are drawn

    figure, ax = plt.subplots(figsize=(3, 3.3))
    ax.imshow(image)
    ax.imshow(heatmap, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    ax.set_title(caption, fontsize=9)
    ax.axis("off")
    save_png(figure, path)


def table(results: Sequence[FilePrediction]) -> str:
    """Aligned text: file, probability, label, out-of-distribution score, flags; a failed file's line says why
    instead."""
    width = max(len("file"), *(len(result.file) for result in results))
    lines = [f"{'file':<{width}}  probability  label      ood score  flags"]
    for result in results:
        if result.error:
            lines.append(f"{result.file:<{width}}  error: {result.error}")
        else:
            score = "n/a" if result.ood_score is None else f"{result.ood_score:.1f}"
            lines.append(f"{result.file:<{width}}  {result.probability:>11.4f}  {result.label:<9}  {score:>9}  "
                         f"{result.flags or '-'}")
    return "\n".join(lines)


def write_predictions_csv(path: Path, results: Sequence[FilePrediction]) -> None:
    atomic.write_csv(path, FIELDS, [[getattr(result, field) for field in FIELDS] for result in results])


def write_predictions_json(path: Path, results: Sequence[FilePrediction]) -> None:
    atomic.write_json(path, [asdict(result) for result in results], sort_keys=False)
