"""What blur, enlargement and noise do to a prediction, and how the detail check (pneumonia.ood.DetailCheck) flags them.

    python -m benchmarks.detail_check                      # the committed baseline: models/, its validation split
    python -m benchmarks.detail_check --model DIR --manifest DIR/data/manifests/val.csv --name detail_check-DIR

Each X-ray of the validation split (of the run that trained the model: never its test split) and of the external
set (`--external`, Kaggle's official test split: another acquisition) is changed (a Gaussian blur of r pixels of the
stored image; shrunk to 1/k of its size and enlarged back, as a thumbnail enlarged; Gaussian noise of sd grey
levels), saved as PNG and predicted as `pneumonia predict` predicts it (pneumonia.classifier, the bundle's own
threshold and checks). Per change: the share of normal X-rays called pneumonia, of pneumonia X-rays missed, how far
the probabilities moved from the image's as stored, and the shares the detail check flags blurred or noisy and the
out-of-distribution score flags. The model's bundle must hold a detail check (evaluated since it exists).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, quiet_tensorflow, write_report
from benchmarks.run_all import machine
from benchmarks.small_images import add_report_arguments, png_file, shown_path, validation_and_external

# (name, kind, amount): as stored, then each change at growing strength
CHANGES = (("as stored", "none", 0), *(("blur", "blur", r) for r in (0.5, 1, 1.5, 2, 3)),
           *(("enlarged", "enlarged", k) for k in (2, 3, 4, 8)), *(("noise", "noise", sd) for sd in (3, 5, 8, 12, 16)))


def changed_png(image, kind: str, amount: float, seed: int) -> bytes:
    """`image` (PIL, grey) blurred, enlarged from 1/amount of its size or with noise added, as a PNG file."""
    from PIL import Image, ImageFilter

    if kind == "blur":
        image = image.filter(ImageFilter.GaussianBlur(amount))
    elif kind == "enlarged":
        small = image.resize((max(1, image.width // amount), max(1, image.height // amount)), Image.Resampling.BILINEAR)
        image = small.resize(image.size, Image.Resampling.BICUBIC)
    elif kind == "noise":
        noise = np.random.default_rng(seed).normal(0, amount, (image.height, image.width))
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))
    return png_file(image)


def scored(classifier, images: list[tuple[object, int]]) -> list[dict]:
    """One row per change: the outcomes and flags of `images` changed so."""
    labels = np.array([label for _, label in images])
    rows, stored = [], None
    for name, kind, amount in CHANGES:
        predicted = classifier.predict([classifier.preprocess(changed_png(image, kind, amount, index))
                                        for index, (image, _) in enumerate(images)])
        stored = predicted.probabilities if stored is None else stored
        moved = np.abs(predicted.probabilities - stored)
        called = predicted.probabilities >= classifier.threshold
        flagged = predicted.blurred | predicted.noisy
        rows.append({
            "change": name, "amount": amount, "images": len(images),
            "normal_called_pneumonia": float(called[labels == 0].mean()),
            "pneumonia_missed": float((~called[labels == 1]).mean()),
            "mean_moved": float(moved.mean()), "moved_over_0.2": float(np.mean(moved > 0.2)),
            "moved_over_0.2_unflagged": float(np.mean((moved > 0.2) & ~flagged)),
            "blurred": float(predicted.blurred.mean()), "noisy": float(predicted.noisy.mean()),
            "ood_flagged": float(np.mean([classifier.out_of_distribution(score) for score in predicted.ood_scores])),
        })
    return rows


def markdown(report: dict) -> str:
    lines = ["# Blur, enlargement and noise: the detail check", "",
             f"`{report['command']}` ({report['date']}, {report['machine']['cpu']}). The model: {report['model']}, "
             f"{report['image_size']} px input, threshold {report['threshold']:.3f}, detail band "
             f"[{report['band'][0]:.2f}, {report['band'][1]:.2f}]. Each X-ray changed (blur: a Gaussian of r px of the "
             "stored image; enlarged: shrunk to 1/k and enlarged back; noise: Gaussian, sd in grey levels), then "
             "predicted as `pneumonia predict` does. Moved: |p - p as stored|.", ""]
    for name, rows in report["sets"].items():
        lines += [f"## {name}", "",
                  "| change | normal called pneumonia | pneumonia missed | mean moved | moved > 0.2 | moved > 0.2, "
                  "not flagged | flagged blurred | flagged noisy | flagged out of distribution |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {row['change']}{'' if row['change'] == 'as stored' else ' ' + format(row['amount'], 'g')} | "
                  f"{row['normal_called_pneumonia']:.2f} | {row['pneumonia_missed']:.2f} | {row['mean_moved']:.3f} | "
                  f"{row['moved_over_0.2']:.2f} | {row['moved_over_0.2_unflagged']:.2f} | {row['blurred']:.2f} | "
                  f"{row['noisy']:.2f} | {row['ood_flagged']:.2f} |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models", help="a model bundle (folder or .keras file)")
    parser.add_argument("--manifest", type=Path, default=REPO / "data/manifests/val.csv",
                        help="the validation manifest of the run that trained the model")
    add_report_arguments(parser, "detail_check")
    args = parser.parse_args(argv)
    quiet_tensorflow()
    from datetime import UTC, datetime

    from pneumonia.classifier import load_classifier
    from pneumonia.errors import PipelineError

    classifier = load_classifier(args.model)
    if classifier.ood is None or classifier.ood.detail is None:
        raise PipelineError(f"{args.model} holds no detail check: evaluate it again (`dvc repro -f -s evaluate`)")
    sets = validation_and_external(args.manifest, args.external, args.limit)
    report = {
        "command": " ".join(["python -m benchmarks.detail_check", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(UTC).date().isoformat(), "machine": machine(), "model": shown_path(args.model),
        "image_size": classifier.image_size, "threshold": classifier.threshold,
        "band": [classifier.ood.detail.low, classifier.ood.detail.high],
        "sets": {name: scored(classifier, images) for name, images in sets.items()},
    }
    write_report(args.out, args.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
