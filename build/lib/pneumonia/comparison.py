"""Compare the runs of an MLflow experiment on equal terms: what each model scored on the test split
against what it cost to train (seconds, peak memory, parameters).

Writes runs.md and runs.csv (one row per trained run, best test AUC first) and runs.png (test
accuracy and AUC against training time and peak memory).
"""

import logging
import math
from pathlib import Path
from typing import Any

from pneumonia import tracking
from pneumonia.atomic import write_csv, write_text
from pneumonia.errors import PipelineError

log = logging.getLogger(__name__)

PARAM_COLUMNS = ["model.name", "model.weights", "model.output", "train.fine_tune", "train.warmup_epochs",
          "train.lr_schedule", "train.ensemble_members", "data.image_size"]
COSTS = ["train_seconds", "peak_memory_mb", "gpu_peak_memory_mb", "total_params", "trainable_params", "epochs_trained"]
SCORES = ["best_val_auc", "test_accuracy", "test_roc_auc", "test_pr_auc", "test_sensitivity", "test_specificity",
          "test_f1"]
PLOTTED_SCORES = {"test_accuracy": "test accuracy", "test_roc_auc": "test ROC AUC"}
PLOTTED_COSTS = {"train_seconds": "training time (s)", "peak_memory_mb": "peak memory of the process (MB)"}


def table_rows(runs: list[tracking.RecordedRun]) -> list[dict[str, Any]]:
    """One row per run that finished training, best test ROC AUC first (runs without one last)."""
    rows = []
    for run in runs:
        metrics = run.metrics
        if "train_seconds" not in metrics:  # failed or still training: nothing to compare
            continue
        rows.append({
            "run_id": run.run_id,
            "dvc_experiment": run.tags.get("dvc.exp_name", ""),
            **{name: run.params.get(name, "") for name in PARAM_COLUMNS},
            **{name: metrics.get(name) for name in COSTS + SCORES},
        })
    return sorted(rows, key=lambda row: -(row["test_roc_auc"] if row["test_roc_auc"] is not None else -math.inf))


def label(row: dict[str, Any]) -> str:
    strategy = f"/{row['train.fine_tune']}" if row["model.name"] != "custom_cnn" else ""
    members = row.get("train.ensemble_members") or "1"  # runs from before the param have none: one model
    ensemble = f" x{members}" if members != "1" else ""
    return f"{row['model.name']}{strategy}{ensemble} {row['dvc_experiment'] or row['run_id'][:8]}"


def shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() else f"{value:.4g}"
    return str(value)


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every column, less the cost and score columns no run has (e.g. GPU memory on CPU machines)."""
    return [name for name in rows[0] if name not in COSTS + SCORES or any(row[name] is not None for row in rows)]


def markdown_table(rows: list[dict[str, Any]], names: list[str], experiment: str) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([
        f"# Runs of MLflow experiment `{experiment}`",
        "",
        ("Test metrics of the evaluate stage; cost of the train stage (seconds of fitting, peak memory "
         "of the process in MB). Best test ROC AUC first."),
        "",
        line(names),
        line(["---"] * len(names)),
        *(line([shown(row[name])[:8] if name == "run_id" else shown(row[name]) for name in names]) for row in rows),
    ]) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from pneumonia.plotting import plt, save_png

    figure, axes = plt.subplots(len(PLOTTED_SCORES), len(PLOTTED_COSTS), figsize=(11, 8), squeeze=False)
    for i, (score, score_label) in enumerate(PLOTTED_SCORES.items()):
        for j, (cost, cost_label) in enumerate(PLOTTED_COSTS.items()):
            ax = axes[i][j]
            points = [row for row in rows if row[score] is not None and row[cost] is not None]
            for row in points:
                ax.scatter(row[cost], row[score])
                ax.annotate(label(row), (row[cost], row[score]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_xlabel(cost_label)
            ax.set_ylabel(score_label)
            ax.grid(alpha=0.3)
            ax.margins(0.2)  # room for the labels
    figure.suptitle("Test accuracy and ROC AUC against the cost of training")
    figure.tight_layout()
    save_png(figure, path, tight=False)


def compare(experiment: str, out: Path) -> list[dict[str, Any]]:
    """Write runs.md, runs.csv and runs.png for `experiment` into `out`; returns the rows."""
    rows = table_rows(tracking.experiment_runs(experiment, "Nothing was compared."))
    if not rows:
        raise PipelineError(f"MLflow experiment {experiment!r} has no run that finished training yet; "
                            "run the pipeline first (dvc exp run).")
    names = columns(rows)
    write_csv(out / "runs.csv", names, [[shown(row[name]) for name in names] for row in rows])
    write_text(out / "runs.md", markdown_table(rows, names, experiment))
    plot(rows, out / "runs.png")
    log.info("compared %d runs of %r into %s", len(rows), experiment, out)
    return rows
