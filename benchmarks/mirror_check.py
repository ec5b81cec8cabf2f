"""How well the mirror check (pneumonia.ood.MirrorCheck) tells X-rays as stored from X-rays mirrored left to right.

    python -m benchmarks.mirror_check              # the repository's project after `dvc repro`: its manifests
    python -m benchmarks.mirror_check --manifests DIR/data/manifests --name mirror_check-DIR   # another project

The check is fitted as the evaluate stage fits it: on the training split's model inputs (each image as training
saw it: pneumonia.classifier.model_input, at data.image_size and tfrecords.jpeg_quality of params.yaml). It is
scored on the validation split (never the test split) and on the external set (`--external`, Kaggle's official test
split: another acquisition), each as stored and mirrored: the share flagged as mirrored. It needs no model: the
check reads the layout thumbnail only. By construction a mirrored image's log-odds is the stored one's negated, so
the mirrored share flagged is the share of stored images the check reads the right way round.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, write_report
from benchmarks.run_all import machine
from benchmarks.small_images import add_report_arguments, external_files, manifest_files, shown_path


def model_inputs(files: list[tuple[Path | bytes, int]], image_size: int, jpeg_quality: int,
                 limit: int | None) -> np.ndarray:
    """The model inputs of the first `limit` (path or file bytes, label), each as training saw its image."""
    from pneumonia.classifier import model_input

    return np.stack([model_input(source, image_size, jpeg_quality) for source, _ in files[:limit]])


def scored(check, inputs: np.ndarray) -> dict:
    """The share flagged as stored and mirrored, and the log-odds' quantiles as stored."""
    from pneumonia.ood import layout

    log_odds = check.log_odds(layout(inputs))
    mirrored = check.log_odds(layout(inputs[:, :, ::-1]))
    return {"images": len(inputs), "flagged_as_stored": float(np.mean(log_odds < 0)),
            "flagged_mirrored": float(np.mean(mirrored < 0)),
            "log_odds_quantiles": {str(q): float(np.quantile(log_odds, q)) for q in (0.01, 0.05, 0.5)}}


def markdown(report: dict) -> str:
    lines = ["# The mirror check", "",
             f"`{report['command']}` ({report['date']}, {report['machine']['cpu']}). Fitted on the "
             f"{report['fitted_on']} training images of `{report['manifests']}` at {report['image_size']} px (the "
             "evaluate stage's fit); each set scored as stored and mirrored left to right.", "",
             "| set | images | flagged as stored (false alarms) | flagged mirrored (caught) | log-odds as stored: "
             "1% / 5% / median |", "|---|---|---|---|---|"]
    for name, row in report["sets"].items():
        quantiles = " / ".join(f"{value:.1f}" for value in row["log_odds_quantiles"].values())
        lines.append(f"| {name} | {row['images']} | {100 * row['flagged_as_stored']:.1f}% | "
                     f"{100 * row['flagged_mirrored']:.1f}% | {quantiles} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifests", type=Path, default=REPO / "data/manifests",
                        help="a prepared project's manifests: train.csv to fit on, val.csv to score")
    add_report_arguments(parser, "mirror_check")
    args = parser.parse_args(argv)
    from datetime import UTC, datetime

    from pneumonia.config import load_params
    from pneumonia.ood import MirrorCheck, layout

    params = load_params(REPO / "params.yaml")
    size, quality = params.data.image_size, params.tfrecords.jpeg_quality
    train = model_inputs(manifest_files(args.manifests / "train.csv"), size, quality, args.limit)
    check = MirrorCheck.fit(layout(train))
    sets = {"validation": model_inputs(manifest_files(args.manifests / "val.csv"), size, quality, args.limit)}
    if args.external:
        sets["external"] = model_inputs(external_files(Path(args.external)), size, quality, args.limit)
    report = {
        "command": " ".join(["python -m benchmarks.mirror_check", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(UTC).date().isoformat(), "machine": machine(), "manifests": shown_path(args.manifests),
        "image_size": size, "fitted_on": len(train),
        "sets": {name: scored(check, inputs) for name, inputs in sets.items()},
    }
    write_report(args.out, args.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
