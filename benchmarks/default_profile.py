"""The README's results table: the default profile (params.yaml as committed) trained from scratch on
the sample with several seeds, by the pipeline itself, and the test metrics it reports.

    python -m benchmarks.default_profile            # 3 seeds, ~15 min each on 2 CPU cores
    python -m benchmarks.default_profile --smoke    # synthetic data, 1 epoch: checks that it works

In a copy of the project, for each seed: `dvc exp run -S data.source=local -S train.seed=<seed>`
(the first seed is params.yaml's, i.e. the README's main command), then metrics/train.json and
metrics/test.json as the run wrote them, and how each threshold rule carries over between halves
of the validation split (benchmarks.threshold_rules: the evidence for the default rule, from
validation alone). Writes <out>/default_profile.json and .md; the README's tables are copied from
the .md. Only the evaluate stage reads the test split, as always.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from benchmarks import threshold_rules
from benchmarks.common import REPO, SAMPLE_ZIP, load_average
from benchmarks.run_all import machine

sys.path.insert(0, str(REPO / "tests"))
import conftest  # the tests' project copy, and their environment for tools (this venv, no outside DVC)

TARGETS = {"roc_auc": 0.99, "sensitivity": 0.95, "specificity": 0.93}  # issue 9, on the sample's test split
METRICS = ("roc_auc", "sensitivity", "specificity", "accuracy")  # with bootstrap intervals in metrics/test.json
SMOKE_PARAMS = {"data.source": "synthetic", "data.image_size": 64, "data.synthetic.image_size": 64,
                "data.synthetic.patients_per_class": 40, "data.synthetic.images_per_patient": 1,
                "train.epochs": 1, "train.batch_size": 8, "evaluate.bootstrap_samples": 100}


def run_seed(project: Path, seed: int, overrides: dict, rule_repeats: int) -> dict:
    settings = [arg for key, value in {**overrides, "train.seed": seed}.items() for arg in ("-S", f"{key}={value}")]
    started = time.perf_counter()
    conftest.run(["dvc", "exp", "run", *settings], project)
    wall = time.perf_counter() - started
    test = json.loads((project / "metrics/test.json").read_text())
    train = json.loads((project / "metrics/train.json").read_text())
    return {
        "seed": seed,
        **{name: test[name] for name in (*METRICS, "threshold")},
        "ci95": {name: [test["ci95"][name]["low"], test["ci95"][name]["high"]] for name in METRICS},
        "best_epoch": train["best_epoch"], "epochs_trained": train["epochs_trained"],
        "train_seconds": train["train_seconds"], "pipeline_seconds": round(wall, 1),
        "threshold_rules_on_validation": threshold_rules.compare_rules(project, rule_repeats)["rules"],
    }


def mean_and_spread(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds (the spread the issue asks for), and the range."""
    keys = (*METRICS, "threshold", "train_seconds")
    return {key: {"mean": statistics.fmean(run[key] for run in runs),
                  "sd": statistics.stdev(run[key] for run in runs) if len(runs) > 1 else 0.0,
                  "min": min(run[key] for run in runs), "max": max(run[key] for run in runs)} for key in keys}


def profile(params: dict) -> str:
    model, train, data = params["model"], params["train"], params["data"]
    augment = ", ".join(f"{key} {value}" for key, value in train["augment"].items() if value not in (0, "none"))
    return (f"{model['name']} (weights {model['weights']}), {data['image_size']} px, {train['epochs']} epochs max "
            f"(early stopping on {train['monitor']}, patience {train['early_stopping_patience']}), batch "
            f"{train['batch_size']}, learning rate {train['learning_rate']} {train['lr_schedule']}, class weights "
            f"{train['class_weight']}, augmentation: {augment or 'none'}, threshold {params['evaluate']['threshold']} "
            f"on validation")


def markdown(report: dict) -> str:
    def cell(run: dict, name: str) -> str:
        low, high = run["ci95"][name]
        return f"{run[name]:.3f} [{low:.3f}, {high:.3f}]"

    def minutes(seconds: float) -> str:
        return f"{seconds / 60:.1f} min"

    summary = report["summary"]

    def spread(name: str) -> str:
        return f"{summary[name]['mean']:.3f} ± {summary[name]['sd']:.3f}"

    lines = [
        f"Profile: {report['profile']}.",
        f"Data: {report['data']}.",
        "",
        "| seed | ROC AUC [95% CI] | sensitivity [95% CI] | specificity [95% CI] | accuracy [95% CI] | threshold "
        "| best epoch / trained | training time |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {run['seed']} | {' | '.join(cell(run, name) for name in METRICS)} | {run['threshold']:.3f} "
          f"| {run['best_epoch']} / {run['epochs_trained']} | {minutes(run['train_seconds'])} |"
          for run in report["runs"]),
        f"| mean ± sd | {' | '.join(spread(name) for name in METRICS)} | {spread('threshold')} | "
        f"| {minutes(summary['train_seconds']['mean'])} ± {minutes(summary['train_seconds']['sd'])} |",
        "",
        "Targets (issue 9; mean over seeds / every seed): "
        + "; ".join(f"{name} ≥ {bound}: {'met' if report['targets'][name]['mean_met'] else 'NOT met'} / "
                    f"{'met' if report['targets'][name]['every_seed_met'] else 'NOT met'}"
                    for name, bound in TARGETS.items()) + ".",
        "",
        "Threshold rules on validation alone (`benchmarks/threshold_rules.py`): each rule chooses on a random "
        f"half of the validation patients and is scored on the other half, {report['rule_repeats']} halvings per "
        "seed; mean over seeds of the held-out means:",
        "",
        "| rule | held-out sensitivity | held-out specificity | held-out balanced accuracy |",
        "|---|---|---|---|",
        *(f"| {rule} | " + " | ".join(
            f"{statistics.fmean(run['threshold_rules_on_validation'][rule][name]['mean'] for run in report['runs']):.3f}"
            for name in ("sensitivity", "specificity", "balanced_accuracy")) + " |"
          for rule in report["runs"][0]["threshold_rules_on_validation"]),
        "",
        f"Reproduce: `{report['command']}` (one seed: `dvc exp run -S data.source=local -S train.seed=<seed>`). "
        f"Measured {report['date']} on {report['machine']['cpu']} ({report['machine']['cores']} cores), "
        f"load average {report['load_average']['before']} before, {report['load_average']['after']} after.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="synthetic data, 1 epoch, 2 seeds: checks that it works")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: params.yaml's train.seed, then 1 and 2")
    parser.add_argument("--sample", type=Path, default=SAMPLE_ZIP, help="the chest X-ray sample zip")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks", help="folder for default_profile.json/.md")
    args = parser.parse_args()

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    seeds = args.seeds or [params["train"]["seed"], 1, 2][: 2 if args.smoke else 3]
    overrides = SMOKE_PARAMS if args.smoke else {"data.source": "local", "data.local_path": str(args.sample.resolve())}
    before = load_average()
    with tempfile.TemporaryDirectory(prefix="pneumonia-default-profile-") as temporary:
        project = conftest.copy_project(Path(temporary) / "project")
        conftest.commit_all(project)
        rule_repeats = 20 if args.smoke else 200
        runs = [run_seed(project, seed, overrides, rule_repeats) for seed in seeds]
        data = json.loads((project / "metrics/data.json").read_text())
        used = yaml.safe_load((project / "params.yaml").read_text())  # as the last run left it: same profile
    report = {
        "profile": profile(used), "params": used,
        "data": (f"{'synthetic (smoke run)' if args.smoke else args.sample.name}, images used (NORMAL / PNEUMONIA): "
                 + ", ".join(f"{split} {counts['NORMAL']} / {counts['PNEUMONIA']}"
                             for split, counts in data["images"].items())),
        "runs": runs, "summary": mean_and_spread(runs), "rule_repeats": rule_repeats,
        "targets": {name: {"bound": bound, "mean_met": statistics.fmean(run[name] for run in runs) >= bound,
                           "every_seed_met": all(run[name] >= bound for run in runs)}
                    for name, bound in TARGETS.items()},
        "command": "python -m benchmarks.default_profile" + (" --smoke" if args.smoke else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine(),
        "load_average": {"before": before, "after": load_average()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "default_profile.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "default_profile.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
