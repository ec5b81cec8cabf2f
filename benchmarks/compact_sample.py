"""What a newcomer's first run gives: `dvc exp run` on the committed compact sample (data_sample/, what
`dvc repro` uses as cloned), per seed, with params.yaml as committed plus the overrides given.

    python -m benchmarks.compact_sample --seeds 42 1 2
    python -m benchmarks.compact_sample --name min_epochs_15 --seeds 42 1 2 -S train.min_epochs=15

Each run is the pipeline itself in a copy of the project (the copy's own library: edits made while it
trains do not reach it). Per run: the in-distribution test ROC AUC, sensitivity and specificity at the
threshold chosen on validation, that threshold, the best epoch and the epochs trained. The aim (issue 36):
ROC AUC >= 0.98 and a threshold between 0.1 and 0.9 on every seed. Runs accumulate in
<out>/compact_sample.json (a rerun of a name and seed replaces its row); <out>/compact_sample.md is made
from all of them.
"""

import argparse
import json
import os
import statistics
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import harness  # project copies and the environment for tools (this venv, no outside DVC)
from benchmarks.common import REPO, cpus_of_runs, load_average
from benchmarks.run_all import cpu_description, machine
from pneumonia.atomic import write_json, write_text

HEALTHY_ROC_AUC = 0.98
HEALTHY_THRESHOLDS = (0.1, 0.9)


def run_one(project: Path, seed: int, overrides: list[str]) -> dict:
    settings = [arg for setting in [*overrides, f"train.seed={seed}"] for arg in ("-S", setting)]
    harness.run_experiment(project, settings, PYTHONPATH=str(project / "src"))
    evaluation = json.loads((project / "metrics/evaluation.json").read_text())
    train = json.loads((project / "metrics/train.json").read_text())
    test = evaluation["test"]
    scores = json.loads((project / "reports/evaluation/test.json").read_text())
    return {"seed": seed, "cpu": cpu_description(machine()), "threshold": evaluation["threshold"],
            "calibration": scores.get("calibration"),
            **{name: test[name] for name in ("roc_auc", "sensitivity", "specificity", "accuracy")},
            "ece": scores["ece"],
            **{name: train[name] for name in ("best_epoch", "epochs_trained", "train_seconds")},
            "load_average": load_average()}


def healthy(run: dict) -> bool:
    low, high = HEALTHY_THRESHOLDS
    return run["roc_auc"] >= HEALTHY_ROC_AUC and low <= run["threshold"] <= high


def markdown(report: dict) -> str:
    lines = ["The committed compact sample (`dvc exp run` as cloned, plus the overrides): in-distribution test "
             f"split, at the threshold chosen on validation. Healthy: ROC AUC >= {HEALTHY_ROC_AUC} and a threshold "
             f"in [{HEALTHY_THRESHOLDS[0]}, {HEALTHY_THRESHOLDS[1]}].", "",
             "| name | overrides | seed | ROC AUC | sensitivity | specificity | ECE | threshold | best epoch / trained "
             "| training | load | healthy |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, group in report["groups"].items():
        for run in group["runs"]:
            lines.append(f"| {name} | `{' '.join(group['overrides']) or 'none'}` | {run['seed']} | "
                         f"{run['roc_auc']:.3f} | {run['sensitivity']:.3f} | {run['specificity']:.3f} | "
                         f"{'n/a' if run.get('ece') is None else format(run['ece'], '.3f')} | "
                         f"{run['threshold']:.3f} | {run['best_epoch']} / {run['epochs_trained']} | "
                         f"{run['train_seconds'] / 60:.1f} min | {run['load_average']} | "
                         f"{'yes' if healthy(run) else 'no'} |")
        aucs = [run["roc_auc"] for run in group["runs"]]
        if len(aucs) > 1:
            lines.append(f"| {name} | | mean | {statistics.fmean(aucs):.3f} | | | | | | | | "
                         f"{sum(map(healthy, group['runs']))} of {len(aucs)} |")
    lines += ["", f"Reproduce: `python -m benchmarks.compact_sample --name NAME --seeds ... -S key=value ...`. "
              f"Last run {report['date']} on {report['machine']['cpu']} ({report['machine']['cores']} cores, "
              "shared: the load column is the 1-minute load average at each run's end)."
              + cpus_of_runs([(f"{name} {run['seed']}", run.get("cpu", "")) for name, group in report["groups"].items()
                            for run in group["runs"]])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="default", help="the row group's name")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override, as dvc exp run -S")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    report_path = args.out / "compact_sample.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"groups": {}}
    group = report["groups"].setdefault(args.name, {"overrides": args.overrides, "runs": []})
    if group["overrides"] != args.overrides:
        parser.error(f"{args.name!r} was run with {group['overrides']}: name these overrides differently")
    report.update(date=datetime.now(UTC).strftime("%Y-%m-%d"), machine=machine())
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pneumonia-compact-sample-") as temporary:
        project = harness.copy_project(Path(temporary) / "project")
        harness.commit_all(project)
        for seed in args.seeds:
            run = run_one(project, seed, args.overrides)
            group["runs"] = [old for old in group["runs"] if old["seed"] != seed] + [run]
            print(json.dumps(run), flush=True)
            write_json(report_path, report, sort_keys=False)  # kept run by run
            write_text(args.out / "compact_sample.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
