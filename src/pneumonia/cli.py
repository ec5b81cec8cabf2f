"""The `pneumonia` command: tools around the pipeline (the pipeline itself runs with `dvc repro`)."""

import argparse
import json
import os
import sys
from pathlib import Path

from pneumonia import paths
from pneumonia.logs import import_tensorflow_quietly, run_stage


def dvc_experiments(params_file: Path, overrides: list[str]) -> list[tuple[list[str], dict]]:
    """`params_file` as `dvc exp run -S ...` makes it for each experiment it runs (a sweep, `-S a=1,2`,
    queues one per combination): (that experiment's overrides, the params as the stages read them).
    DVC itself applies them, to a copy: Hydra's override grammar, YAML-typed values, no new keys. The file
    is read as the stages read it (config.read_params_file: its size, aliases, encoding and keys checked first)."""
    import shutil
    import tempfile

    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides, get_hydra_sweeps
    from hydra.errors import HydraException

    from pneumonia.config import read_params_file
    from pneumonia.errors import PipelineError

    read_params_file(params_file)  # refused before DVC parses it: an oversized file would hang both
    by_file = to_path_overrides(overrides)
    if set(by_file) - {paths.PARAMS.name}:
        raise PipelineError(f"-S {' '.join(overrides)}: check-params reads {params_file} only; drop the file prefix")
    experiments = []
    try:
        for sweep in get_hydra_sweeps(by_file) if by_file else [{}]:
            with tempfile.TemporaryDirectory() as folder:
                copy = Path(shutil.copy(params_file, Path(folder) / paths.PARAMS.name))
                if sweep:
                    apply_overrides(copy, sweep[paths.PARAMS.name])
                experiments.append((sweep.get(paths.PARAMS.name, []), read_params_file(copy) or {}))
    except FileNotFoundError:
        raise PipelineError(f"{params_file} not found: run it from the repository root, or pass --params") from None
    except (InvalidArgumentError, HydraException) as exc:
        reason = str(exc.__cause__ or exc).splitlines()[0]
        raise PipelineError(f"-S {' -S '.join(overrides)}: {reason} (as `dvc exp run` would refuse it). Use "
                            "KEY=VALUE with a key of params.yaml, e.g. -S model.name=xception.") from None
    return experiments


def check_params(args: argparse.Namespace) -> None:
    from pneumonia.config import auto_keys, flatten, parse_params

    experiments = dvc_experiments(args.params, args.set_param)
    for number, (overrides, raw) in enumerate(experiments, 1):
        settings = " ".join(f"-S {override}" for override in overrides)
        params = parse_params(raw, f"{args.params} {settings}".strip())
        if len(experiments) > 1:
            print(f"experiment {number} of {len(experiments)}: {settings}", file=sys.stderr)
        print(json.dumps(params.model_dump(), indent=2))
        resolved = flatten(params)
        for key in auto_keys(raw):
            print(f"{key}: auto -> {resolved[key]} (model.name {params.model.name})", file=sys.stderr)


def compare_runs(args: argparse.Namespace) -> None:
    from pneumonia.comparison import compare
    from pneumonia.config import load_params

    experiment = args.experiment or load_params().tracking.experiment
    rows = compare(experiment, args.out)
    print(f"{len(rows)} runs of {experiment!r} compared: {args.out / 'runs.md'}, runs.csv, runs.png")


def predict(args: argparse.Namespace) -> None:
    from pneumonia import atomic, inference

    for option, path in (("--csv", args.csv), ("--json", args.json)):
        if path:  # before predicting, not after
            atomic.refuse_folder(path, option)
    model = args.model_uri or args.model
    if is_mlflow_uri(model):
        from pneumonia import serving

        copy = serving.download_logged_model(model, "Nothing was predicted.")
        import_tensorflow_if_needed(args, serving.logged_model_file(copy), args.gradcam)
        classifier = serving.logged_classifier(model, args.input_checks, copy)
    else:
        from pneumonia.classifier import load_classifier

        import_tensorflow_if_needed(args, Path(model), args.gradcam)
        classifier = load_classifier(Path(model), args.input_checks)
    files, left_out = inference.image_files(args.paths)
    inference.say_left_out(left_out)
    results = inference.predict_files(classifier, files)
    print(inference.table(results))
    if args.csv:
        inference.write_predictions_csv(args.csv, results)
    if args.json:
        inference.write_predictions_json(args.json, results)
    if args.gradcam:
        written = inference.write_gradcam(classifier, results, args.gradcam)
        print(f"{len(written)} Grad-CAM overlays in {args.gradcam}", file=sys.stderr)
    if failed := sum(result.error is not None for result in results):
        print(f"{failed} of {len(results)} files could not be predicted", file=sys.stderr)
        sys.exit(1)


def import_tensorflow_if_needed(args: argparse.Namespace, bundle: Path | None, gradcam: bool = False) -> None:
    """TensorFlow imported now, its start-up lines held back (unless --verbose), where the model `bundle` (a .keras
    file or its folder; None: not known) will need it: for Grad-CAM maps, and where ONNX Runtime does not predict
    with the bundle (classifier.predicts_with_onnx). Not otherwise: its import is most of a prediction's time."""
    from pneumonia.classifier import predicts_with_onnx
    from pneumonia.model_settings import model_file

    if args.verbose or (bundle is not None and not model_file(bundle).is_file()):
        return  # TensorFlow's lines shown; or no model there, which loading it says at once
    if gradcam or bundle is None or not predicts_with_onnx(bundle):
        import_tensorflow_quietly()


def promote(args: argparse.Namespace) -> None:
    from pneumonia import serving

    version = serving.promote(args.name, args.source, args.target, args.version)
    print(f"{args.name}@{args.target} -> version {version}")


def serve_model(args: argparse.Namespace) -> None:
    from pneumonia import serving

    serving.check_free(args.host, args.port)
    copy = serving.download_logged_model(args.model_uri, "Nothing was served.")
    import_tensorflow_if_needed(args, serving.logged_model_file(copy))
    serving.serve(copy, args.host, args.port, args.workers)


def build_sample(args: argparse.Namespace) -> None:
    from pneumonia.data.sample import build_sample as build

    summary = build(args.archive, args.out, {"train": args.train, "test": args.test}, args.seed)
    for split, classes in summary.images.items():
        print(f"{split}: " + ", ".join(f"{c} {n} images of {summary.patients[split][c]} patients"
                                      for c, n in classes.items()))
    print(f"{args.out}: {summary.size_bytes} bytes, sha256 {summary.sha256}")


def download_competition(args: argparse.Namespace) -> None:
    from pneumonia.data import kaggle

    info = kaggle.download_competition(args.name, args.out)
    print(f"{info.path}: {info.size_bytes} bytes, sha256 {info.sha256}. Score the model on it: "
          f"`dvc exp run -S evaluate.external={info.path}`")


def is_mlflow_uri(model: str) -> bool:
    return model.startswith(("runs:/", "models:/")) or "://" in model


def add_predict_parser(commands) -> None:
    predict_parser = commands.add_parser(
        "predict", help="probability of pneumonia and label for image files (JPEG, PNG, DICOM) or folders of them",
        description="Probability of pneumonia and label at the run's decision threshold for each image, its "
                    "out-of-distribution score and flag (how unlike the training X-rays it is), and why it is "
                    "outside the model's intended use (DICOM header: body part, view, patient age). Intended use: "
                    "frontal chest X-rays of children aged 1 to 5; decision support, not a diagnosis "
                    f"({paths.MODEL_CARD}). Every setting comes with the model (model.json, model.ood.npz and "
                    "model.onnx beside model.keras): a copy of models/ works from any folder. "
                    "Exit code 1 when some file could not be predicted.")
    predict_parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    predict_parser.add_argument("--model", default=str(paths.MODELS),
                                help="the model: a folder holding model.keras, model.json, model.ood.npz and "
                                     "model.onnx (default models/), a .keras file with its .json, .ood.npz and .onnx "
                                     "beside it "
                                     "(e.g. one `pneumonia adapt` wrote), or an MLflow model: runs:/<run id>/model, "
                                     "models:/<name>@champion")
    predict_parser.add_argument("--model-uri", help="an MLflow model (the same as --model runs:/... or models:/...)")
    predict_parser.add_argument("--input-checks", choices=("flag", "refuse", "ignore"),
                                help="what an image outside the intended use (a DICOM header's lateral view, other "
                                     "body part or age; smaller than the model's input) does: flagged, refused or "
                                     "not checked (default: the model's setting, evaluate.input_checks: flag)")
    predict_parser.add_argument("--csv", type=Path, metavar="FILE", help="also write the predictions as CSV")
    predict_parser.add_argument("--json", type=Path, metavar="FILE", help="also write the predictions as JSON")
    predict_parser.add_argument("--gradcam", type=Path, metavar="DIR",
                                help="also write each image with the Grad-CAM map of its predicted class to DIR")
    predict_parser.set_defaults(handler=predict)


def pipeline_outputs() -> list[Path]:
    """The outputs of dvc.yaml's stages (resolved; none without a dvc.yaml): what only `dvc repro` writes."""
    import yaml

    dvc_file = paths.project_root() / "dvc.yaml"
    if not dvc_file.is_file():
        return []
    stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {})
    outs = [out for stage in stages.values() for out in stage.get("outs", [])]
    return [(paths.project_root() / (next(iter(out)) if isinstance(out, dict) else out)).resolve() for out in outs]


def check_model_output(out: Path, model: Path) -> None:
    """`pneumonia adapt --out`, before any work: a new .keras file in a writable folder, not the model it
    reads and not a pipeline output (DVC would find its output changed; the run's model would be lost)."""
    import os

    from pneumonia.errors import PipelineError
    from pneumonia.model_settings import model_file

    where, model = f"--out {out}", model_file(model)
    if out.suffix != ".keras":
        raise PipelineError(f"{where}: name a .keras file (the only format Keras 3 saves a whole model in)")
    if out.resolve() == model.resolve() or (out.exists() and model.exists() and out.samefile(model)):
        raise PipelineError(f"{where} is the model it adapts (--model {model}): name another file, e.g. "
                            "models/adapted.keras")
    if any(out.resolve() == output or output in out.resolve().parents for output in pipeline_outputs()):
        raise PipelineError(f"{where} is an output of the DVC pipeline (dvc.yaml), which `dvc repro` alone writes: "
                            "name another file, e.g. models/adapted.keras")
    if out.is_dir():
        raise PipelineError(f"{where} is a folder: name a .keras file")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise PipelineError(f"{where}: {out.parent} is not a folder this user can write to: create it, or name a "
                            "file in another folder")


def adapt(args: argparse.Namespace) -> None:
    import keras
    import numpy as np

    from pneumonia import adaptation, engines, inference
    from pneumonia.classifier import load_classifier
    from pneumonia.data import input_checks
    from pneumonia.errors import PipelineError
    from pneumonia.model_settings import write_bundle

    check_model_output(args.out, args.model)
    classifier = load_classifier(args.model, args.input_checks)
    read, unreadable, outside = [], [], []
    files, left_out = inference.image_files(args.paths)
    inference.say_left_out(left_out)
    for path in files:
        # flag or refuse alike: a lateral view, a leg, a thumbnail are not the site's chest X-rays, whose statistics
        # the adaptation is for
        reasons = [] if classifier.input_checks == "ignore" else input_checks.reasons(path, classifier.age_years,
                                                                                     classifier.image_size)
        if reasons:
            outside.append(f"{path}: {'; '.join(reasons)}")
            continue
        try:
            read.append((path, classifier.preprocess(path)))
        except PipelineError as exc:  # a DICOM file that is not an X-ray it can read: the message says why
            unreadable.append(f"{path}: {exc}")
        except Exception as exc:  # noqa: BLE001 - any decoder failure: the file is left out, and said so
            unreadable.append(f"{path}: {type(exc).__name__}")
    images, flagged = adaptation_images(classifier, read)
    if outside:
        print(f"{len(outside)} file(s) left out, outside the model's intended use (--input-checks ignore to use "
              f"them): {'; '.join(outside[:5])}", file=sys.stderr)
    if flagged:
        print(f"{len(flagged)} file(s) left out, flagged by the model's checks as predict flags them (--input-checks "
              f"ignore to use them): {'; '.join(flagged[:5])}", file=sys.stderr)
    if unreadable:
        print(f"{len(unreadable)} file(s) left out, not readable images: {'; '.join(unreadable[:5])}", file=sys.stderr)
    if len(images) < args.min_images:
        needs = "batch-norm statistics need" if args.method == "batch_norm" else "self-training needs"
        raise PipelineError(f"{len(images)} image(s) found in {', '.join(map(str, args.paths))}: {needs} "
                            f"at least --min-images {args.min_images} X-rays of the site, unlabelled, e.g. a "
                            "few weeks of its studies.")
    try:
        if args.method == "self_training":
            # the model's own output is pseudo-labelled: at the threshold before calibration
            threshold = classifier.calibration.uncalibrated(classifier.threshold)
            adapted = adaptation.self_train(classifier.model, np.stack(images), threshold, args.seed)
        else:
            adapted = adaptation.adapt_batch_norm(classifier.model, np.stack(images))
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    how = f"{args.method} on {len(images)} images of a site"
    how += f", seed {args.seed}" if args.method == "self_training" else ""
    write_bundle(args.out, lambda written: keras.saving.save_model(adapted, written),
                 classifier.settings.model_copy(update={"adapted": how}), classifier.ood, engines.onnx_model(adapted))
    print(f"adapted to {len(images)} images of the site: {args.out} "
          f"(use it with `pneumonia predict --model {args.out} ...`)")


def adaptation_images(classifier, read: list[tuple[Path, object]]) -> tuple[list, list[str]]:
    """The images of `read` (path, model input) that adapt uses, and "path: flags" for those it leaves out: the
    ones `pneumonia predict` would flag out of distribution, mirrored, blurred or noisy (under --input-checks flag
    or refuse). Their statistics are not the site's chest X-rays' either, and self-training would learn its
    pseudo-labels of them."""
    from pneumonia import inference

    if classifier.input_checks == "ignore" or not read:
        return [image for _, image in read], []
    predicted = classifier.predict([image for _, image in read])
    flags = [inference.prediction(classifier, str(path), predicted, index, ()).flags
             for index, (path, _) in enumerate(read)]
    return ([image for (_, image), flag in zip(read, flags, strict=True) if not flag],
            [f"{path}: {flag}" for (path, _), flag in zip(read, flags, strict=True) if flag])


def at_least_one(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is below 1: batch-norm statistics need images")
    return number


def seed(text: str) -> int:
    from pneumonia.config import seed_in_range

    try:
        return seed_in_range(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc}") from None


def add_adapt_parser(commands) -> None:
    adapt_parser = commands.add_parser(
        "adapt", help="adapt the model to a new site from its unlabelled X-rays (batch-norm statistics, or "
                      "self-training)",
        description="Adapt the model to a site from its own X-rays (no labels needed) and save the adapted model. "
                    "batch_norm: re-estimate the batch-norm statistics on them (AdaBN). self_training: the same, "
                    "then a few epochs of fine-tuning on the images the model labels confidently (odds of 19:1 from "
                    "the run's threshold), from augmented views, both classes weighed alike (Noisy Student; "
                    "FixMatch's confidence); deterministic for a --seed, under a minute on 2 CPU cores for "
                    "custom_cnn. Measured effect on another acquisition: benchmarks/site_adaptation-*.md. Only "
                    "for networks without a nested backbone (custom_cnn, or an ensemble of them: each member "
                    "adapted).")
    adapt_parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="the site's image files or folders")
    adapt_parser.add_argument("--model", type=Path, default=paths.MODELS,
                              help="the model's folder or .keras file (default models/)")
    adapt_parser.add_argument("--out", type=Path, required=True,
                              help="where to write the adapted .keras model (its .json, .ood.npz and .onnx beside it)")
    adapt_parser.add_argument("--min-images", type=at_least_one, default=50,
                              help="refuse fewer images than this (default 50)")
    adapt_parser.add_argument("--method", choices=("batch_norm", "self_training"), default="batch_norm",
                              help="default: batch_norm")
    adapt_parser.add_argument("--seed", type=seed, default=0, help="self_training's seed (default 0)")
    adapt_parser.add_argument("--input-checks", choices=("flag", "refuse", "ignore"),
                              help="images outside the intended use (a DICOM header's lateral view, other body part "
                                   "or age; smaller than the model's input) and those predict flags (out of "
                                   "distribution, mirrored, blurred, noisy) are left out under flag or refuse, used "
                                   "under ignore (default: the model's setting, evaluate.input_checks: flag)")
    adapt_parser.set_defaults(handler=adapt, tensorflow=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumonia", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser(
        "check-params", help="validate params.yaml and print it with all defaults filled in",
        description="Validate params.yaml as every stage does and print the params the stages will use: defaults "
                    "filled in, each `auto` resolved (what it became on stderr). With -S, as DVC's `dvc exp run -S` "
                    "would set them, params.yaml untouched: `pneumonia check-params -S model.name=xception`; a "
                    "sweep (-S 'model.name=a,b') prints each experiment it would queue.")
    check.add_argument("--params", type=Path, default=paths.PARAMS, help=f"default: {paths.PARAMS}")
    check.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                       help="override a param as `dvc exp run -S` does (repeatable; values are YAML: 0.5, none, "
                            "true, [1, 2])")
    check.set_defaults(handler=check_params)

    add_predict_parser(commands)
    add_adapt_parser(commands)

    competition = commands.add_parser(
        "download-competition", help="download a Kaggle competition's files (e.g. the RSNA pneumonia challenge's "
                                     "DICOMs) with the official kaggle client, for evaluate.external",
        description="Download every file of a Kaggle competition as <name>.zip, with the Kaggle credentials the "
                    "download stage uses; Kaggle serves them only once you accepted the competition's rules. "
                    "evaluate.external reads the RSNA challenge's zip as it is (docs/data.md).")
    competition.add_argument("name", help="the competition's name, e.g. rsna-pneumonia-detection-challenge")
    competition.add_argument("--out", type=Path, required=True, help="the folder the zip is written to")
    competition.set_defaults(handler=download_competition)

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

    served = commands.add_parser(
        "serve", help="serve a logged model over HTTP: `mlflow models serve`'s app, refusing over-nested JSON",
        description="Serve a logged model as `mlflow models serve --env-manager local` does (MLflow's scoring "
                    "server: POST /invocations, GET /ping; the same requests and answers, docs/serving.md), with a "
                    "JSON body nested deeper than any request refused with HTTP 400 (MLflow's server answers it "
                    "500). Store: MLFLOW_TRACKING_URI, else mlflow.db at the repository root.")
    served.add_argument("-m", "--model-uri", required=True,
                        help="runs:/<run id>/model, models:/<name>@<alias>, or a logged model's folder")
    served.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    served.add_argument("-p", "--port", type=int, default=5000, help="default 5000")
    served.add_argument("-w", "--workers", type=int, default=1, help="server processes (default 1)")
    served.set_defaults(handler=serve_model)

    from pneumonia.data.sample import DEFAULT_FRACTIONS, DEFAULT_SEED

    sample = commands.add_parser(
        "build-sample", help="build the compact sample (data_sample/) from an archive in the Kaggle layout",
        description="Draw whole patients, the same share of each class per split, deterministically "
                    "(the same archive and options give a byte-identical zip). Images are copied, not re-encoded.")
    sample.add_argument("archive", type=Path,
                        help="zip in the Kaggle layout, e.g. ../shared/datasets/chest-xray-sample.zip")
    sample.add_argument("--out", type=Path, default=paths.SAMPLE, help=f"the zip written (default {paths.SAMPLE})")
    sample.add_argument("--train", type=float, default=DEFAULT_FRACTIONS["train"], help="share of train patients kept")
    sample.add_argument("--test", type=float, default=DEFAULT_FRACTIONS["test"], help="share of test patients kept")
    sample.add_argument("--seed", type=int, default=DEFAULT_SEED)
    sample.set_defaults(handler=build_sample)

    compared = commands.add_parser(
        "compare", help="table (markdown, CSV) and plot of the MLflow runs: test metrics against training cost",
        description="Every run of the MLflow experiment that finished training, best test ROC AUC first: model, "
                    "weights, fine-tuning, image size, training time, peak memory, parameters and test metrics, "
                    "in runs.md and runs.csv, and runs.png (test accuracy and ROC AUC against training time and "
                    "memory). Store: MLFLOW_TRACKING_URI, else mlflow.db at the repository root. For the DVC "
                    "experiments' params and headline metrics side by side: "
                    "`dvc exp show --only-changed --drop '.*/'`.")
    compared.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment in params.yaml)")
    compared.add_argument("--out", type=Path, default=paths.COMPARISON, help="folder for runs.md, runs.csv, runs.png")
    compared.set_defaults(handler=compare_runs)
    for command in commands.choices.values():
        command.add_argument("--verbose", action="store_true",
                             help="also TensorFlow's own log (its C++ start-up notices), hidden by default")
    # True: the command imports TensorFlow first (quietly, unless --verbose); predict and serve know whether they
    # need it once they have the model (import_tensorflow_if_needed)
    parser.set_defaults(tensorflow=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # Before TensorFlow is imported: its C++ log (start-up notices, a missing GPU) only with --verbose
    if args.verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        if args.tensorflow:
            import_tensorflow_quietly()
    run_stage(lambda: args.handler(args))
