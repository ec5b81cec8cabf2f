"""What an image smaller than the model's input does to its prediction, and what flags it.

    python -m benchmarks.small_images                      # the committed baseline: models/, its validation split
    python -m benchmarks.small_images --model DIR --manifest DIR/data/manifests/val.csv --external ''

Each X-ray of the validation split (of the run that trained the model: never its test split) and of the external
set (`--external`, Kaggle's official test split: another acquisition) is shrunk so that its shorter side is s
pixels, saved as PNG, and predicted as `pneumonia predict` predicts it (pneumonia.classifier, the bundle's own
threshold, out-of-distribution reference and input checks, here with evaluate.input_checks: flag). Per size: the
share of normal X-rays called pneumonia, of pneumonia X-rays missed, and of all flagged, by the
out-of-distribution score and by the size check of pneumonia.data.input_checks.
"""

import argparse
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, quiet_tensorflow, write_report
from benchmarks.external_validity import EXTERNAL_ZIP
from benchmarks.run_all import machine

SIDES = (None, 160, 128, 112, 96, 80, 64, 48, 32, 24)  # None: as stored


def png_file(image) -> bytes:
    """`image` (PIL) as a PNG file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def shrunk_png(image, side: int | None) -> bytes:
    """`image` (PIL, grey) with its shorter side `side` px (None: as it is), as a PNG file."""
    from PIL import Image

    if side is not None:
        scale = side / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    return png_file(image)


def manifest_files(manifest: Path) -> list[tuple[Path, int]]:
    """(path, label) of each row of a manifest (paths relative to the project it belongs to)."""
    from pneumonia.data.manifest import read_manifest

    project = manifest.resolve().parents[2]  # <project>/data/manifests/<split>.csv
    return [(project / record.path, record.label) for record in read_manifest(manifest)]


def external_files(archive: Path) -> list[tuple[bytes, int]]:
    """(file bytes, label) of an external set's zip, labelled by its NORMAL/ and PNEUMONIA/ folders as the
    external stage labels them."""
    from pneumonia.data.external import locate_images
    from pneumonia.data.layout import has_image_suffix, is_macos_litter

    with zipfile.ZipFile(archive) as opened:
        names = [name for name in opened.namelist() if has_image_suffix(name) and not is_macos_litter(name)]
        return [(opened.read(name), label) for name, label in locate_images(names, str(archive))]


def grey_images(files: list[tuple[Path | bytes, int]]) -> list[tuple[object, int]]:
    """(grey PIL image, label) of each (path or file bytes, label)."""
    from PIL import Image

    return [(Image.open(io.BytesIO(source) if isinstance(source, bytes) else source).convert("L"), label)
            for source, label in files]


def add_report_arguments(parser, name: str) -> None:
    """--external, --limit, --out and --name: the sets validation_and_external reads and where write_report writes
    the report, as each benchmark of changed X-rays takes them."""
    parser.add_argument("--external", default=str(EXTERNAL_ZIP), help="another site's zip; '' for none")
    parser.add_argument("--limit", type=int, help="at most this many images a set (a smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--name", default=name, help="the report's file name, without suffix")


def validation_and_external(manifest: Path | None, external: str, limit: int | None = None) -> dict[str, list]:
    """{"validation": (grey image, label) of the manifest's X-rays (none for None), "external": of the zip's (none
    for '')}, at most `limit` of each."""
    sets = {} if manifest is None else {"validation": grey_images(manifest_files(manifest)[:limit])}
    if external:
        sets["external"] = grey_images(external_files(Path(external))[:limit])
    return sets


def scored(classifier, images: list[tuple[object, int]], sides=SIDES) -> list[dict]:
    """One row per size: the outcomes and flags of `images` shrunk to it."""
    labels = np.array([label for _, label in images])
    rows = []
    for side in sides:
        files = [shrunk_png(image, side) for image, _ in images]
        predicted = classifier.predict([classifier.preprocess(file) for file in files])
        called = predicted.probabilities >= classifier.threshold
        rows.append({
            "side": side, "images": len(images),
            "normal_called_pneumonia": float(called[labels == 0].mean()),
            "pneumonia_missed": float((~called[labels == 1]).mean()),
            "mean_probability_normal": float(predicted.probabilities[labels == 0].mean()),
            "ood_flagged": float(np.mean([classifier.out_of_distribution(score) for score in predicted.ood_scores])),
            "size_flagged": float(np.mean([any(reason.startswith("smaller than") for reason in classifier.flags(file))
                                           for file in files])),
        })
    return rows


def shown_path(path: Path) -> str:
    """`path` as a reader of the report finds it: from the repository when it is in it."""
    return str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path)


def markdown(report: dict) -> str:
    lines = ["# Images smaller than the model's input", "",
             f"`{report['command']}` ({report['date']}, {report['machine']['cpu']}). The model: {report['model']}, "
             f"{report['image_size']} px input, threshold {report['threshold']:.3f}. Each X-ray shrunk so that its "
             "shorter side is s px (as stored: -), then predicted as `pneumonia predict` does.", ""]
    for name, rows in report["sets"].items():
        lines += [f"## {name}", "",
                  "| s (px) | images | normal called pneumonia | pneumonia missed | mean p, normal | flagged out of "
                  "distribution | flagged by size |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {row['side'] or '-'} | {row['images']} | {row['normal_called_pneumonia']:.2f} | "
                  f"{row['pneumonia_missed']:.2f} | {row['mean_probability_normal']:.3f} | {row['ood_flagged']:.2f} | "
                  f"{row['size_flagged']:.2f} |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models", help="a model bundle (folder or .keras)")
    parser.add_argument("--manifest", type=Path, default=REPO / "data/manifests/val.csv",
                        help="the validation manifest of the run that trained it")
    parser.add_argument("--external", default=str(EXTERNAL_ZIP), help="another site's zip; '' for none")
    parser.add_argument("--sides", type=int, nargs="*", help="shorter sides to shrink to (default: as stored, "
                                                             f"then {', '.join(map(str, SIDES[1:]))})")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args(argv)
    quiet_tensorflow()
    from datetime import UTC, datetime

    from pneumonia.classifier import load_classifier

    classifier = load_classifier(args.model, input_checks_policy="flag")
    sides = SIDES if args.sides is None else (None, *args.sides)
    sets = validation_and_external(args.manifest, args.external)
    report = {
        "command": " ".join(["python -m benchmarks.small_images", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(UTC).date().isoformat(), "machine": machine(),
        "model": shown_path(args.model), "image_size": classifier.image_size, "threshold": classifier.threshold,
        "sets": {name: scored(classifier, images, sides) for name, images in sets.items()},
    }
    write_report(args.out, "small_images", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
