"""What another tone curve (gamma, histogram equalisation) does to models' probabilities, paired over seeds.

    python -m benchmarks.tone_curves --model default 42 A.keras --model default 1 B.keras \
        --model gamma1 42 C.keras --model gamma1 1 D.keras

A tone curve is what another site's window or look-up table changes, and no per-image check flags it
(docs/reliability.md: the training X-rays' own curves span it). The fix would be a model that moves less, e.g. one
trained with stronger gamma augmentation (`train.augment.gamma`); this benchmark compares such arms, each a model
file per seed, on the same X-rays: each X-ray of the external set (`--external`, Kaggle's official test split:
another acquisition) and, with `--manifest`, of a validation split, its grey levels mapped by the curve, saved as PNG
and read as `pneumonia predict` reads it. Per model and curve: the ROC AUC, and how far the probabilities moved from
the image's as stored (threshold-free: the model files need no bundle). Per arm and curve: the mean over its seeds,
and each seed's difference from the first arm's model of that seed.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, quiet_tensorflow, write_report
from benchmarks.run_all import machine
from benchmarks.small_images import add_report_arguments, png_file, shown_path, validation_and_external

# (name, gamma or None for histogram equalisation); gamma g maps grey level x to 255 (x / 255)^g
CURVES = (("as stored", 1.0), ("gamma 0.5", 0.5), ("gamma 0.7", 0.7), ("gamma 1.4", 1.4), ("gamma 2", 2.0),
          ("equalized", None))
MOVED = 0.2  # a probability moved by more than this is a changed reading, not rounding


def gamma_curve(gamma: float) -> np.ndarray:
    """The look-up table of grey levels 0-255 through the gamma curve: uint8 (256,)."""
    return np.round(255 * (np.arange(256) / 255) ** gamma).astype(np.uint8)


def toned_png(image, gamma: float | None) -> bytes:
    """`image` (PIL, grey) with its grey levels mapped by the gamma curve, or its histogram equalised, as PNG."""
    from PIL import ImageOps

    if gamma is None:
        return png_file(ImageOps.equalize(image))
    return png_file(image.point(gamma_curve(gamma).tolist()))


def scored(model, image_size: int, jpeg_quality: int, images: list[tuple[object, int]]) -> list[dict]:
    """One row per curve: the ROC AUC of `model` on `images` so mapped and how far its probabilities moved."""
    from sklearn.metrics import roc_auc_score

    from pneumonia.classifier import model_input
    from pneumonia.evaluation.predictions import pneumonia_probability

    labels = np.array([label for _, label in images])
    rows, stored = [], None
    for name, gamma in CURVES:
        inputs = np.stack([model_input(toned_png(image, gamma), image_size, jpeg_quality) for image, _ in images])
        probabilities = pneumonia_probability(model.predict(inputs.astype(np.float32), batch_size=64, verbose=0))
        stored = probabilities if stored is None else stored
        moved = np.abs(probabilities - stored)
        ranked = len(set(labels)) == 2  # a --limit run may hold one class
        rows.append({"curve": name, "images": len(images),
                     "roc_auc": float(roc_auc_score(labels, probabilities)) if ranked else float("nan"),
                     "mean_moved": float(moved.mean()), f"moved_over_{MOVED}": float(np.mean(moved > MOVED))})
    return rows


def summary(models: list[dict], set_name: str) -> list[dict]:
    """Per arm and curve: the means over its seeds, and per seed the difference from the first arm's model."""
    arms = list(dict.fromkeys(model["arm"] for model in models))
    first = {model["seed"]: model for model in models if model["arm"] == arms[0]}
    rows = []
    for arm in arms:
        of_arm = [model for model in models if model["arm"] == arm]
        for index, (curve, _) in enumerate(CURVES):
            row = {"arm": arm, "curve": curve, "seeds": [model["seed"] for model in of_arm]}
            for metric in ("roc_auc", f"moved_over_{MOVED}"):
                values = [model["sets"][set_name][index][metric] for model in of_arm]
                row[metric] = float(np.mean(values))
                row[f"{metric}_vs_{arms[0]}"] = [
                    model["sets"][set_name][index][metric] - first[model["seed"]]["sets"][set_name][index][metric]
                    for model in of_arm if model["seed"] in first]
            rows.append(row)
    return rows


def markdown(report: dict) -> str:
    moved = f"moved_over_{MOVED}"
    lines = ["# Tone curves: paired seeds", "",
             f"`{report['command']}` ({report['date']}, {report['machine']['cpu']}). Each X-ray's grey levels "
             "mapped by the curve (gamma g: 255 (x / 255)^g; equalized: its histogram equalised), then read as "
             f"`pneumonia predict` reads it. Moved: |p - p as stored| > {MOVED}. Versus: each seed's difference from "
             f"the {report['arms'][0]} model of the same seed.", "",
             "| model | arm | seed |", "|---|---|---|",
             *(f"| {model['path']} | {model['arm']} | {model['seed']} |" for model in report["models"]), ""]
    versus = report["arms"][0]
    for set_name, rows in report["summary"].items():
        lines += [f"## {set_name}", "",
                  "| arm | curve | ROC AUC (mean) | ROC AUC versus, per seed | moved (mean) | moved versus, per seed |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {row['arm']} | {row['curve']} | {row['roc_auc']:.3f} | "
                  f"{', '.join(format(d, '+.3f') for d in row['roc_auc_vs_' + versus])} | {row[moved]:.2f} | "
                  f"{', '.join(format(d, '+.2f') for d in row[moved + '_vs_' + versus])} |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs=3, action="append", required=True, metavar=("ARM", "SEED", "KERAS_FILE"),
                        help="a model file, its arm (e.g. default, gamma1) and its training seed; repeat")
    parser.add_argument("--manifest", type=Path, help="also a validation manifest (of the run that trained them)")
    add_report_arguments(parser, "tone_curves")
    args = parser.parse_args(argv)
    for arm, seed, path in args.model:  # before any image is read or model loaded
        if not seed.isdigit():
            parser.error(f"--model {arm} {seed} {path}: the seed is a whole number, e.g. --model {arm} 42 {path}")
        if not Path(path).is_file():
            parser.error(f"--model {arm} {seed} {path}: no such model file")
    quiet_tensorflow()
    from datetime import UTC, datetime

    from pneumonia.config import load_params
    from pneumonia.models.build import load_model

    sets = validation_and_external(args.manifest, args.external, args.limit)
    # the JPEG re-encode of params.yaml's TFRecords, as training saw its images (the model files carry no settings)
    jpeg_quality = load_params(REPO / "params.yaml").tfrecords.jpeg_quality
    models = []
    for arm, seed, path in args.model:
        model = load_model(Path(path))
        size = int(model.input_shape[1])
        models.append({"arm": arm, "seed": int(seed), "path": shown_path(Path(path)),
                       "sets": {name: scored(model, size, jpeg_quality, images) for name, images in sets.items()}})
    report = {
        "command": " ".join(["python -m benchmarks.tone_curves", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(UTC).date().isoformat(), "machine": machine(),
        "arms": list(dict.fromkeys(model["arm"] for model in models)), "models": models,
        "summary": {name: summary(models, name) for name in sets},
    }
    write_report(args.out, args.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
