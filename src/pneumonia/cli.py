"""The `pneumonia` command: tools around the pipeline (the pipeline itself runs with `dvc repro`)."""

import argparse
import json
import sys
from pathlib import Path

from pneumonia import paths
from pneumonia.logs import run_stage


def check_params(args: argparse.Namespace) -> None:
    import yaml

    from pneumonia.config import auto_keys, flatten, load_params

    params = load_params(args.params)
    print(json.dumps(params.model_dump(), indent=2))
    resolved = flatten(params)
    for key in auto_keys(yaml.safe_load(args.params.read_text())):
        print(f"{key}: auto -> {resolved[key]} (model.name {params.model.name})", file=sys.stderr)


def compare_runs(args: argparse.Namespace) -> None:
    from pneumonia.comparison import compare
    from pneumonia.config import load_params

    experiment = args.experiment or load_params().tracking.experiment
    rows = compare(experiment, args.out)
    print(f"{len(rows)} runs of {experiment!r} compared: {args.out / 'runs.md'}, runs.csv, runs.png")


def predict(args: argparse.Namespace) -> None:
    from pneumonia import prediction

    if args.model_uri:
        from pneumonia import serving

        classifier = serving.load_classifier(args.model_uri)
    else:
        from pneumonia.config import load_params

        jpeg_quality = load_params().tfrecords.jpeg_quality
        classifier = prediction.load_classifier(paths.MODEL, paths.TEST_METRICS, jpeg_quality)
    results = prediction.predict_files(classifier, prediction.image_files(args.paths))
    print(prediction.table(results))
    if args.csv:
        prediction.write_csv(results, args.csv)
    if args.json:
        prediction.write_json(results, args.json)
    if args.gradcam:
        written = prediction.write_gradcam(classifier, results, args.gradcam)
        print(f"{len(written)} Grad-CAM overlays in {args.gradcam}", file=sys.stderr)
    if failed := sum(result.error is not None for result in results):
        print(f"{failed} of {len(results)} files could not be predicted", file=sys.stderr)
        sys.exit(1)


def promote(args: argparse.Namespace) -> None:
    from pneumonia import serving

    version = serving.promote(args.name, args.source, args.target, args.version)
    print(f"{args.name}@{args.target} -> version {version}")


def build_sample(args: argparse.Namespace) -> None:
    from pneumonia.data.sample import build_sample as build

    summary = build(args.archive, args.out, {"train": args.train, "test": args.test}, args.seed)
    for split, classes in summary.images.items():
        print(f"{split}: " + ", ".join(f"{c} {n} images of {summary.patients[split][c]} patients"
                                      for c, n in classes.items()))
    print(f"{args.out}: {summary.size_bytes} bytes, sha256 {summary.sha256}")


def add_predict_parser(commands) -> None:
    predict_parser = commands.add_parser(
        "predict", help="probability of pneumonia and label for image files (JPEG, PNG) or folders of them",
        description="Probability of pneumonia and label at the run's decision threshold for each image. "
                    "Default model: models/model.keras with the threshold in metrics/test.json. "
                    "Exit code 1 when some file could not be predicted.")
    predict_parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    predict_parser.add_argument("--model-uri", help="an MLflow model instead: runs:/<run id>/model, "
                                                    "models:/<name>@candidate, models:/<name>@champion")
    predict_parser.add_argument("--csv", type=Path, metavar="FILE", help="also write the predictions as CSV")
    predict_parser.add_argument("--json", type=Path, metavar="FILE", help="also write the predictions as JSON")
    predict_parser.add_argument("--gradcam", type=Path, metavar="DIR",
                                help="also write each image with the Grad-CAM map of its predicted class to DIR")
    predict_parser.set_defaults(handler=predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumonia", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-params", help="validate params.yaml and print it with all defaults filled in")
    check.add_argument("--params", type=Path, default=paths.PARAMS)
    check.set_defaults(handler=check_params)

    add_predict_parser(commands)

    promoted = commands.add_parser(
        "promote", help="move a registered model's alias (default: champion to the version aliased candidate)",
        description="Point an alias of a registered model at a version: by default 'champion' at the version "
                    "aliased 'candidate' (the last one evaluated with tracking.register_model). Store: "
                    "MLFLOW_TRACKING_URI, else mlflow.db at the repository root.")
    promoted.add_argument("name", help="registered-model name (tracking.register_model)")
    promoted.add_argument("--from", dest="source", default="candidate", help="alias of the version to promote")
    promoted.add_argument("--to", dest="target", default="champion", help="alias to move to it")
    promoted.add_argument("--version", help="promote this version number instead of the --from alias")
    promoted.set_defaults(handler=promote)

    from pneumonia.data.sample import DEFAULT_FRACTIONS, DEFAULT_SEED

    sample = commands.add_parser(
        "build-sample", help="build the compact sample (data_sample/) from an archive in the Kaggle layout",
        description="Draw whole patients, the same share of each class per split, deterministically "
                    "(the same archive and options give a byte-identical zip). Images are copied, not re-encoded.")
    sample.add_argument("archive", type=Path, help="zip in the Kaggle layout, e.g. ../shared/datasets/chest-xray-sample.zip")
    sample.add_argument("--out", type=Path, default=paths.SAMPLE, help=f"the zip written (default {paths.SAMPLE})")
    sample.add_argument("--train", type=float, default=DEFAULT_FRACTIONS["train"], help="share of train patients kept")
    sample.add_argument("--test", type=float, default=DEFAULT_FRACTIONS["test"], help="share of test patients kept")
    sample.add_argument("--seed", type=int, default=DEFAULT_SEED)
    sample.set_defaults(handler=build_sample)

    compared = commands.add_parser(
        "compare", help="table (markdown, CSV) and plot of the MLflow runs: test metrics against training cost")
    compared.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment in params.yaml)")
    compared.add_argument("--out", type=Path, default=paths.COMPARISON, help="folder for runs.md, runs.csv, runs.png")
    compared.set_defaults(handler=compare_runs)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_stage(lambda: args.handler(args))
