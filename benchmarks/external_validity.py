"""The README's results: training profiles judged on X-rays of another acquisition.

    python -m benchmarks.external_validity                          # default and previous profiles, 3 seeds each
    python -m benchmarks.external_validity --profiles light_aug --seeds 42   # add runs to the report
    python -m benchmarks.external_validity --smoke                  # synthetic data, 1 epoch: checks that it works
    python -m benchmarks.external_validity --tables-only            # remake the .md and README table from the .json

Each run is the pipeline itself, in a copy of the project: `dvc exp run -S data.source=local
-S data.local_path=<sample> -S evaluate.external=<external set> -S train.seed=<seed>` plus the
profile's overrides. It reads back reports/evaluation/test.json (the sample's own test split: the same
acquisition as training, in-distribution), reports/evaluation/external.json (the official Kaggle test
images of ../shared/datasets/chest-xray-external.zip: another acquisition) and metrics/train.json. Then,
from the run's model and predictions:

* threshold rules: each chooses its threshold on validation (never on the external set) and is
  scored on the external set;
* a threshold chosen on the site's own labelled images: chosen on a random half of the external
  patients and scored on the other half (cross-fitted, many halvings), never on the images it chose on;
* unsupervised site adaptation (pneumonia.adaptation): batch-norm statistics or the class prior
  re-estimated, or self-training, on the unlabelled images of half the external patients, scored on
  the other half at the pipeline's threshold (`adaptation_scores`; benchmarks.site_adaptation scores
  the same on kept models).

Runs accumulate in <out>/external_validity.json (a rerun of a profile and seed replaces its row);
<out>/external_validity.md is made from all of them and copied into README.md between its markers.
The external set is never trained, early-stopped or checkpointed on: it enters only the evaluate
stage, after training.
"""

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml

import harness
from benchmarks.common import (
    REPO,
    SAMPLE_ZIP,
    SCORE_COLUMNS,
    cpus_of_runs,
    load_average,
    replace_block,
    working_directory,
)
from benchmarks.run_all import cpu_description, machine
from benchmarks.threshold_rules import held_out_scores
from pneumonia.atomic import write_json, write_text

EXTERNAL_ZIP = REPO.parent / "shared" / "datasets" / "chest-xray-external.zip"
README_MARKERS = ("<!-- external_validity.md: made by python -m benchmarks.external_validity -->",
                  "<!-- /external_validity.md -->")
README_PROFILES = ("default", "exponential")  # the README's table: the default and the one before it
RULES = ("youden", "sensitivity@0.9", "sensitivity@0.93", "sensitivity@0.95", "sensitivity@0.99", 0.5)
HALVINGS = 100  # random halvings of the external patients for the site-labelled threshold
ADAPT_HALVINGS = 5  # for the adaptations (each adapts and predicts: slower)

# Overrides of params.yaml as committed; "default" is params.yaml itself. A run records the overrides of its
# day (its "overrides"), so a profile defined before a default changed names what it changed then.
# The default before issue 25: input scaled to [0, 1], no weight averaging.
DEFAULT_SCALE = {"model.input_norm": "scale", "train.weight_averaging": "none"}
PREVIOUS_PROFILE = {**DEFAULT_SCALE, "data.image_size": 160, "train.augment.zoom": 0, "train.augment.translation": 0,
            "train.augment.rotation": 0, "train.augment.contrast": 0, "model.crop": 0, "train.label_smoothing": 0,
            "train.epochs": 15, "train.early_stopping_patience": 5, "evaluate.threshold": "youden"}
LIGHT_AUG = {**PREVIOUS_PROFILE, "train.augment.zoom": 0.1, "train.augment.translation": 0.05,
             "train.augment.contrast": 0.1, "train.epochs": 30, "train.early_stopping_patience": 8}
PROFILES = {
    "default": {},  # per_image + ema since issue 25, train.min_epochs 15 since issue 36, cosine since issue 34
    # The default until issue 34: the learning rate x0.9 an epoch (0.05 of it left at epoch 30)
    "exponential": {"train.lr_schedule": "exponential"},
    "default_scale": DEFAULT_SCALE,
    # The default before benchmarks/training_speed.py; its recorded runs (commit 18722ad) drew zoom,
    # rotation and translation with three Keras layers, a rerun draws them with RandomAffine.
    "default_160px": {**DEFAULT_SCALE, "data.image_size": 160},
    "previous": PREVIOUS_PROFILE,  # the default until this benchmark: no augmentation, 15 epochs, youden
    "light_aug": LIGHT_AUG,  # light augmentation, 30 epochs, no crop
    # Levers of issue 25, each alone on default_scale (docs/results.md); the default is per_image and ema together
    "per_image": {"train.weight_averaging": "none"},  # intensity standardised per image
    "ema": {"model.input_norm": "scale"},  # the weights' moving average validated and kept
    "per_image_oversample": {"train.weight_averaging": "none", "train.class_balance": "oversample"},
    # The default until issue 36 made train.min_epochs 15: every epoch kept or counted by early stopping
    "min_epochs_1": {"train.min_epochs": 1},
    # Issue 36: probabilities of the training prior, not of balanced classes (the threshold's place on [0, 1])
    "no_class_weights": {"train.class_balance": "none"},
    # Issue 34's untried regularisers: targets 0.05 / 0.95, so that the other site's normal X-rays are not scored
    # with the training site's confidence
    "label_smoothing": {"train.label_smoothing": 0.1},
    # Issue 34: mixup (alpha 0.2, the usual choice), judged paired against the default
    "mixup": {"train.augment.mixup": 0.2},
    # Issue 34: CutMix (alpha 1, as its paper): a box of another image pasted in, the labels mixed by area
    "cutmix": {"train.augment.cutmix": 1.0},
    # Issue 34: a larger input with per_image (128 px was chosen on input scaled to [0, 1], default_160px)
    "160px": {"data.image_size": 160},
    # Issue 34: each image's histogram equalised instead of standardised (any increasing change of gray levels gone)
    "equalize": {"model.input_norm": "equalize"},
    # Issue 34: decoupled weight decay (AdamW), 0.05 as usual for convnets trained from scratch
    "weight_decay": {"train.weight_decay": 0.05},
    # Issue 34: longer training with the averaging; the default's best epochs are 24 to 30 of its 30
    "45_epochs": {"train.epochs": 45},
    # Issue 34: what another acquisition changes that per_image does not undo: a gamma curve, blur or sharpening,
    # noise (the contrast augmentation is undone by per_image)
    "acquisition": {"train.augment.gamma": 0.3, "train.augment.sharpness": 0.3, "train.augment.noise": 0.02},
    # Another window or look-up table moves the default's probabilities with no flag (docs/reliability.md): gamma
    # curves alone, g in [0.5, 2] (benchmarks/tone_curves.py measures the moves)
    "gamma_1": {"train.augment.gamma": 1.0},
    # and a milder range, g in [0.67, 1.5]: gamma_1 cost specificity and calibration on the X-rays as stored
    "gamma_0.5": {"train.augment.gamma": 0.5},
    # Issue 34: capacity, custom_cnn's convolutions 1.5x as wide (about twice the training's arithmetic)
    "width_1.5": {"model.width": 1.5},
    # Issue 34: warm restarts (SGDR): epochs 1-10 and 11-30 each a cosine from the full learning rate
    "warm_restarts": {"train.lr_schedule": "cosine_restarts"},
    # Issue 34: RandAugment, two operations at Keras' default magnitude, on top of the default's augmentation
    "rand_augment": {"train.augment.rand_augment": 2},
    # Issue 34: distillation of a two-member ensemble (seeds + 1, + 2) into one model (the seed), three trainings
    "distilled": {"train.distillation_teachers": 2},
    # Issue 34: more dropout before custom_cnn's output (its last dense block's 0.3; the blocks before drop 0.2 to 0.7)
    "dropout_0.5": {"model.dropout": 0.5},
    # Issue 36: custom_cnn's first convolution at stride 2 (1.2-1.3x the training speed); kept only if it holds here
    "strided_stem": {"model.stem": "strided"},
    # Issue 34: depth, three separable convolutions in each of custom_cnn's four blocks instead of two
    "depth_3": {"model.convs_per_block": 3},
    # Issue 34: more of the border cut (0.12 of each side instead of 0.08: 98 of 128 px seen), less framing to read
    "crop_0.12": {"model.crop": 0.12},
    # and less of it (0.04: 120 of 128 px seen), in case the cut edge held lung the other site's tight crops show
    "crop_0.04": {"model.crop": 0.04},
    # Issue 34: a stronger from-scratch architecture? MobileNetV2 untrained (its input scaled, as backbones take it)
    "mobilenetv2_scratch": {"model.name": "mobilenetv2", "model.weights": "none"},
    # Issue 36: custom_cnn in mixed bfloat16 (1.1-1.2x an epoch on CPUs with native bfloat16); train.precision auto
    # keeps it in float32: on the external set its ECE was worse on both seeds run (docs/results.md)
    "bfloat16": {"train.precision": "mixed_bfloat16"},
    # Horizontal flips while training (train.augment.flip: none in every default so far): a mirrored X-ray, heart on
    # the right, was called pneumonia far more often than the same X-ray as stored (docs/reliability.md)
    "flip": {"train.augment.flip": "horizontal"},
}
# The smallest custom_cnn takes after model.crop, one worker, the evaluate stage's fewest resamples and images shown
SMOKE_PARAMS = {"data.source": "synthetic", "data.image_size": 40, "data.synthetic.image_size": 40,
                "data.synthetic.patients_per_class": 40, "data.synthetic.images_per_patient": 1,
                "tfrecords.workers": 1, "train.epochs": 1, "train.batch_size": 8, "evaluate.bootstrap_samples": 100,
                "evaluate.images_per_outcome": 1}


def settings(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]


def analyse(project: Path, halvings: int, adapt_halvings: int) -> dict:
    """Threshold rules and site adaptation on the external set, from the run's model (see module doc)."""
    from pneumonia import paths
    from pneumonia.config import load_params
    from pneumonia.data.external import SPLIT
    from pneumonia.data.prepare import patient_id
    from pneumonia.evaluation.predictions import images_at, predict_split
    from pneumonia.evaluation.threshold import choose_threshold
    from pneumonia.models.build import load_model

    with working_directory(project.resolve()):
        params = load_params()
        model = load_model(paths.MODEL)
        val = predict_split(model, paths.TFRECORDS, "val", params.train.batch_size)
        external = predict_split(model, paths.EXTERNAL, SPLIT, params.train.batch_size)
        images = images_at(paths.EXTERNAL, SPLIT, list(range(len(external.labels))))
        threshold = json.loads(paths.EVALUATION_METRICS.read_text())["threshold"]

    patients = [patient_id(name) for name in external.file_names]
    half = patient_halves(external.file_names)
    rules = {}
    for rule in RULES:
        chosen = choose_threshold(val.labels, val.probabilities, rule)
        rules[str(rule)] = {"threshold": chosen, **scored(external.labels, external.probabilities, chosen),
                            "halves": [scored(external.labels[half == side], external.probabilities[half == side],
                                              chosen) for side in (0, 1)]}
    site = held_out_scores(external.labels, external.probabilities, patients, "youden", halvings, seed=0)
    return {"rules": rules, "site_labelled_youden": {name: site[name]["mean"] for name in site},
            **adaptation_scores(model, threshold, external.labels, images, patients, adapt_halvings)}


def patient_halves(file_names: list[str]) -> np.ndarray:
    """0 or 1 per image: two fixed halves of the external patients, by a hash of the patient. A rule that wins on
    the set should win on both."""
    from pneumonia.data.prepare import patient_id

    return np.array([int(hashlib.sha256(patient_id(name).encode()).hexdigest(), 16) % 2 for name in file_names])


def scored(labels, probabilities, at) -> dict:
    from pneumonia.evaluation.metrics import classification_metrics

    found = classification_metrics(labels, probabilities, at)
    return {name: found[name] for name in ("sensitivity", "specificity", "accuracy")}


def adaptation_scores(model, threshold: float, labels: np.ndarray, images: np.ndarray, patients: list[str],
                      halvings: int) -> dict:
    """Unsupervised site adaptation (pneumonia.adaptation), each fitted on the unlabelled images of a random half
    of the patients and scored on the other half at `threshold`, both ways, `halvings` times: per adaptation
    (and the model unadapted, on the same halves) the mean sensitivity, specificity, accuracy and ROC AUC. The
    labels only score. Self-training refused on a half (too few confident images) is counted, not scored. A model
    that nests a backbone gets no batch-norm adaptation nor self-training (None; adaptation.nests_a_backbone)."""
    from sklearn.metrics import roc_auc_score

    from pneumonia import adaptation
    from pneumonia.errors import PipelineError
    from pneumonia.evaluation.predictions import pneumonia_probability

    def predicted(predictor, on) -> np.ndarray:
        return pneumonia_probability(predictor.predict(on, verbose=0, batch_size=64))

    probabilities = predicted(model, images)
    flat = not adaptation.nests_a_backbone(model)
    unique = sorted(set(patients))
    index = np.array([unique.index(patient) for patient in patients])
    rng = np.random.default_rng(0)
    rows = {name: [] for name in ("unadapted", "batch_norm_adapted", "prior_adjusted", "self_trained")}
    refused, seconds = 0, []
    for _ in range(halvings):
        first = (rng.permutation(len(unique)) < len(unique) // 2)[index]
        for fitted_on, scored_on in ((first, ~first), (~first, first)):
            def score(found, scored_on=scored_on) -> dict:
                return {**scored(labels[scored_on], found, threshold),
                        "roc_auc": float(roc_auc_score(labels[scored_on], found))}

            rows["unadapted"].append(score(probabilities[scored_on]))
            prior = adaptation.site_prior(probabilities[fitted_on], training_prior=0.5)
            shifted = adaptation.adjust_to_prior(probabilities[scored_on], 0.5, prior)
            rows["prior_adjusted"].append({**score(shifted), "prior": prior})
            if not flat:
                continue
            adapted = adaptation.adapt_batch_norm(model, images[fitted_on])
            rows["batch_norm_adapted"].append(score(predicted(adapted, images[scored_on])))
            started = time.perf_counter()
            try:
                trained = adaptation.self_train(model, images[fitted_on], threshold)
            except PipelineError:
                refused += 1
                continue
            seconds.append(time.perf_counter() - started)
            rows["self_trained"].append(score(predicted(trained, images[scored_on])))
    def mean(found: list[dict]) -> dict | None:
        return {key: statistics.fmean(row[key] for row in found) for key in found[0]} if found else None

    return {**{name: mean(found) for name, found in rows.items()}, "self_training_refused": refused,
            "self_training_seconds": statistics.fmean(seconds) if seconds else None}


def keep(project: Path, profile: str, seed: int, folder: Path) -> None:
    """The run's model as <folder>/<profile>-<seed>.keras and its validation and external TFRecords under
    <folder>/<profile>/data/ (once a profile: its seeds share them), for benchmarks.prediction_levers."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(project / "models/model.keras", folder / f"{profile}-{seed}.keras")
    for name in ("data/tfrecords", "data/external"):
        if not (folder / profile / name).exists():
            shutil.copytree(project / name, folder / profile / name)


def run_one(project: Path, profile: str, seed: int, overrides: dict, halvings: int, adapt_halvings: int,
            keep_models: Path | None = None) -> dict:
    from pneumonia.config import with_overrides

    started = time.perf_counter()
    run_overrides = {**overrides, **PROFILES[profile], "train.seed": seed}
    # The stages import the copy's library, not the working tree the editable install points at: edits made
    # there during the hours of training must not reach these runs.
    harness.run_experiment(project, settings(run_overrides), PYTHONPATH=str(project / "src"))
    # What this run trained and evaluated with: the copy's params.yaml as `dvc exp run -S` changed it.
    params = with_overrides(yaml.safe_load((project / "params.yaml").read_text()), run_overrides)
    wall = time.perf_counter() - started
    if keep_models:
        keep(project, profile, seed, keep_models)
    from pneumonia import paths

    test, external, train = (json.loads((project / path).read_text())
                             for path in (paths.TEST_SCORES, paths.EXTERNAL_SCORES, paths.TRAIN_METRICS))

    def split(scores: dict) -> dict:
        return {**{name: scores[name] for name in (*SCORE_COLUMNS, "ece", "threshold", "border_share")},
                "ci95": {name: [scores["ci95"][name]["low"], scores["ci95"][name]["high"]] for name in SCORE_COLUMNS}}

    return {"profile": profile, "seed": seed, "cpu": cpu_description(machine()), "overrides": PROFILES[profile],
            "params": params, "test": split(test),
            "external": split(external), "best_epoch": train["best_epoch"], "epochs_trained": train["epochs_trained"],
            "train_seconds": train["train_seconds"], "pipeline_seconds": round(wall, 1),
            **analyse(project, halvings, adapt_halvings)}


def spread(values: list[float]) -> str:
    values = [value for value in values if value is not None]
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "n/a"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(report: dict, summary_only: bool = False) -> str:
    """The report's tables; `summary_only`: the first (one row a profile), for the README: the default and
    the previous default only (every profile is in the report)."""
    by_profile: dict[str, list[dict]] = {}
    for run in report["runs"]:
        by_profile.setdefault(run["profile"], []).append(run)
    order = [name for name in (*PROFILES, *by_profile) if name in by_profile]
    order = list(dict.fromkeys(order))
    if summary_only:
        order = [name for name in order if name in README_PROFILES]

    def cell(runs, where, name):  # n/a for a metric runs made before it was recorded lack (ece)
        return spread([run[where].get(name) for run in runs])

    trained_on = ("the larger sample these runs train on (1,025 images; the compact sample's has 409)"
                  if report.get("sample", SAMPLE_ZIP.name) == SAMPLE_ZIP.name else
                  f"{report['sample']}, the sample these runs train on")
    lines = [
        "External set: 244 X-rays of Kaggle's official test split (another acquisition than training). "
        f"In-distribution: the test split of {trained_on}, same acquisition as training. Mean ± sd over seeds, at "
        "the threshold the pipeline chose on validation.",
        "",
        "| profile | seeds | external ROC AUC | external accuracy | external sensitivity | external specificity "
        "| external ECE | external border share | in-distribution ROC AUC | in-distribution sensitivity / specificity "
        "| in-distribution ECE | training |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        runs = by_profile[name]
        lines.append(
            f"| {name} | {', '.join(str(run['seed']) for run in runs)} | "
            + " | ".join(cell(runs, "external", metric) for metric in SCORE_COLUMNS)
            + f" | {cell(runs, 'external', 'ece')} | {cell(runs, 'external', 'border_share')} | "
            f"{cell(runs, 'test', 'roc_auc')} | {cell(runs, 'test', 'sensitivity')} / "
            f"{cell(runs, 'test', 'specificity')} | {cell(runs, 'test', 'ece')} | "
            f"{statistics.fmean(run['train_seconds'] for run in runs) / 60:.0f} min |")
    if summary_only:
        return "\n".join(lines) + ("\n\nPer run, every profile, operating points and adaptation: "
                                    "[benchmarks/external_validity.md](benchmarks/external_validity.md) "
                                    f"(`{report['command']}`).\n")
    lines += ["", "Each run, external set with 95% bootstrap intervals:", "",
              "| profile | seed | ROC AUC [95% CI] | accuracy [95% CI] | sensitivity | specificity | ECE | threshold "
              "| best epoch / trained |", "|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        for run in by_profile[name]:
            ext = run["external"]
            lines.append(
                f"| {name} | {run['seed']} | {ext['roc_auc']:.3f} [{ext['ci95']['roc_auc'][0]:.3f}, "
                f"{ext['ci95']['roc_auc'][1]:.3f}] | {ext['accuracy']:.3f} [{ext['ci95']['accuracy'][0]:.3f}, "
                f"{ext['ci95']['accuracy'][1]:.3f}] | {ext['sensitivity']:.3f} | {ext['specificity']:.3f} | "
                f"{spread([ext.get('ece')])} | "
                f"{ext['threshold']:.3f} | {run['best_epoch']} / {run['epochs_trained']} |")
    lines += ["", "Operating points on the external set (mean over seeds; sensitivity / specificity / accuracy). "
              "Rules choose on validation; the site's own threshold is chosen on half of the external patients and "
              f"scored on the other half ({report['halvings']} halvings); adaptations fit on the unlabelled images of "
              f"half the patients and are scored on the other half ({report['adapt_halvings']} halvings) at the "
              "pipeline's threshold (batch-norm adapted and self-trained: n/a for backbone profiles, implemented for "
              "custom_cnn only; self-trained: n/a for runs made before it was built; on the models kept of "
              "those, python -m benchmarks.site_adaptation scores it: benchmarks/site_adaptation-<profile>.md):", "",
              "| profile | " + " | ".join(f"rule {rule}" for rule in RULES)
              + " | site's labelled threshold | batch-norm adapted | prior adjusted | self-trained |",
              "|---|" + "---|" * (len(RULES) + 4)]

    def point(runs, pick) -> str:
        values = [pick(run) for run in runs]
        # runs before self-training was scored, refused on every half, or a model that nests a backbone (no
        # batch-norm adaptation)
        if any(value is None for value in values):
            return "n/a"
        return " / ".join(f"{statistics.fmean(value[name] for value in values):.3f}"
                          for name in ("sensitivity", "specificity", "accuracy"))

    for name in order:
        runs = by_profile[name]
        lines.append(f"| {name} | " + " | ".join(point(runs, lambda run, rule=rule: run["rules"][str(rule)])
                                                  for rule in RULES)
                     + f" | {point(runs, lambda run: run['site_labelled_youden'])}"
                     + f" | {point(runs, lambda run: run['batch_norm_adapted'])}"
                     + f" | {point(runs, lambda run: run['prior_adjusted'])}"
                     + f" | {point(runs, lambda run: run.get('self_trained'))} |")
    lines += ["", "The same rules on two fixed halves of the external patients (accuracy, mean over seeds; a rule "
              "that wins on the set should win on both):", "",
              "| profile | " + " | ".join(f"rule {rule}: half A / half B" for rule in RULES) + " |",
              "|---|" + "---|" * len(RULES)]
    for name in order:
        runs = by_profile[name]
        lines.append(f"| {name} | " + " | ".join(
            " / ".join(f"{statistics.fmean(run['rules'][str(rule)]['halves'][side]['accuracy'] for run in runs):.3f}"
                       for side in (0, 1)) for rule in RULES) + " |")
    lines += ["", "Profiles (overrides of params.yaml as committed): "
              + "; ".join(f"{name}: `{' '.join(settings(by_profile[name][0]['overrides'])) or 'none'}`"
                          for name in order)
              + ".", "",
              f"Reproduce: `{report['command']}`. Last run {report['date']} on {report['machine']['cpu']} "
              f"({report['machine']['cores']} cores)."
              + cpus_of_runs([(f"{run['profile']} {run['seed']}", run.get("cpu", "")) for run in report["runs"]])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", nargs="+", choices=sorted(PROFILES), default=["default", "previous"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="synthetic data and external set, 1 epoch, 1 seed")
    parser.add_argument("--sample", type=Path, default=SAMPLE_ZIP, help="the chest X-ray sample zip")
    parser.add_argument("--external", type=Path, default=EXTERNAL_ZIP, help="the external set (zip or folder)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks", help="folder for external_validity.json/.md")
    parser.add_argument("--keep-models", type=Path, help="keep each run's model and data here "
                        "(for python -m benchmarks.prediction_levers)")
    parser.add_argument("--tables-only", action="store_true", help="no runs: the tables from the existing .json")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    report_path = args.out / "external_validity.json"
    report = json.loads(report_path.read_text()) if report_path.exists() and not args.smoke else {"runs": []}
    if not args.tables_only:
        report = measure(report, args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(report_path, report, sort_keys=False)
    table = markdown(report)
    write_text(args.out / "external_validity.md", table)
    if not args.smoke and args.out.resolve() == (REPO / "benchmarks").resolve():
        replace_block(REPO / "README.md", *README_MARKERS, markdown(report, summary_only=True))
    print(table)


def measure(report: dict, args: argparse.Namespace) -> dict:
    """`report` with the runs of args.profiles x args.seeds added (or replaced)."""
    halvings, adapt_halvings = (4, 1) if args.smoke else (HALVINGS, ADAPT_HALVINGS)
    report = {**report, "params": yaml.safe_load((REPO / "params.yaml").read_text()), "halvings": halvings,
              "adapt_halvings": adapt_halvings, "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine(),
              "command": "python -m benchmarks.external_validity" + (" --smoke" if args.smoke else "") + (
                  f" --sample {args.sample}" if args.sample != SAMPLE_ZIP and not args.smoke else ""),
              **({"sample": args.sample.name} if not args.smoke else {})}
    with tempfile.TemporaryDirectory(prefix="pneumonia-external-validity-") as temporary:
        project = harness.copy_project(Path(temporary) / "project")
        harness.commit_all(project)
        if args.smoke:
            from pneumonia.config import SyntheticConfig
            from pneumonia.data import synthetic

            synthetic.generate(Path(temporary) / "site", SyntheticConfig(patients_per_class=10, images_per_patient=1,
                                                                         image_size=40), seed=99)
            overrides = {**SMOKE_PARAMS, "evaluate.external": str(Path(temporary) / "site" / "train")}
            seeds = args.seeds[:1]
        else:
            overrides = {"data.source": "local", "data.local_path": str(args.sample.resolve()),
                         "evaluate.external": str(args.external.resolve())}
            seeds = args.seeds
        for profile in args.profiles:
            for seed in seeds:
                run = run_one(project, profile, seed, overrides, halvings, adapt_halvings, args.keep_models)
                report["runs"] = [old for old in report["runs"]
                                  if (old["profile"], old["seed"]) != (profile, seed)] + [run]
                print(json.dumps({key: run[key] for key in ("profile", "seed", "external", "test")}), flush=True)
                if not args.smoke:  # kept run by run: hours of training are not lost to a later failure
                    args.out.mkdir(parents=True, exist_ok=True)
                    write_json(args.out / "external_validity.json", report, sort_keys=False)
    return {**report, "load_average": load_average()}


if __name__ == "__main__":
    main()
