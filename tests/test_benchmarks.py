"""Smoke test of the benchmarks: every one runs at tiny sizes and the report is written.

Checks that they work, not the targets (speed is measured by `python -m benchmarks.run_all`, not
asserted here). About two minutes, most of it the DVC benchmark's pipeline runs.
"""

import json
import sys

import pytest
from conftest import REPO, run

BENCHMARKS = ["input_vs_compute", "tfrecords_vs_folders", "conversion_scaling", "incremental_dvc", "memory"]


@pytest.mark.e2e
def test_every_benchmark_runs_and_writes_the_report(tmp_path, sample_zip):
    run([sys.executable, "-m", "benchmarks.run_all", "--smoke", "--out", str(tmp_path), "--sample", str(sample_zip)],
        REPO)

    report = json.loads((tmp_path / "results.json").read_text())
    assert sorted(report["results"]) == sorted(BENCHMARKS)
    for name, result in report["results"].items():
        assert "error" not in result, f"{name} failed:\n{result['error']}"
        assert isinstance(result["met"], bool) and result["measured"], name
        assert result["load_average"]["before"] >= 0, name
    assert report["machine"]["cores"] >= 1 and report["machine"]["versions"]["tensorflow"]
    assert report["results"]["incremental_dvc"]["noop_up_to_date"]
    assert report["results"]["incremental_dvc"]["experiment_run"]["stages_run"] == ["train", "evaluate"]
    assert report["results"]["memory"]["images"]["2x"] == 2 * report["results"]["memory"]["images"]["1x"]

    table = (tmp_path / "results.md").read_text()
    assert "python -m benchmarks.run_all --smoke" in table
    assert sum(line.startswith(("| 1.", "| 2.", "| 3.", "| 4.", "| 5.")) for line in table.splitlines()) == 5


@pytest.mark.e2e
def test_default_profile_runs_each_seed_through_the_pipeline_and_tabulates_it(tmp_path):
    """The script behind the README's results table, on synthetic data with two seeds."""
    run([sys.executable, "-m", "benchmarks.default_profile", "--smoke", "--out", str(tmp_path)], REPO)

    report = json.loads((tmp_path / "default_profile.json").read_text())
    assert [r["seed"] for r in report["runs"]] == [42, 1]
    for result in report["runs"]:
        assert 0 <= result["roc_auc"] <= 1 and result["train_seconds"] > 0 and result["epochs_trained"] == 1
        for name, (low, high) in result["ci95"].items():
            assert low <= result[name] <= high, name
        held_out = result["threshold_rules_on_validation"]
        assert {"youden", "sensitivity@0.95", "0.5"} <= held_out.keys()
        assert held_out["0.5"]["sensitivity"]["mean"] >= 0  # a number, from the validation halves
    aucs = [r["roc_auc"] for r in report["runs"]]
    assert report["summary"]["roc_auc"]["mean"] == sum(aucs) / 2
    assert report["params"]["train"]["seed"] == 1  # the last run's params: seeds really were set
    assert set(report["targets"]) == {"roc_auc", "sensitivity", "specificity"}

    table = (tmp_path / "default_profile.md").read_text()
    assert sum(line.startswith(("| 42 |", "| 1 |", "| mean ± sd |")) for line in table.splitlines()) == 3
    assert sum(line.startswith(("| youden |", "| sensitivity@0.95 |")) for line in table.splitlines()) == 2
    assert "python -m benchmarks.default_profile --smoke" in table


def test_results_page_table_is_the_default_profile_report():
    """docs/results.md shows the pipeline's own table (benchmarks/default_profile.md), not hand-typed figures."""
    table = (REPO / "benchmarks" / "default_profile.md").read_text()
    assert table.strip() in (REPO / "docs" / "results.md").read_text()


def test_performance_page_table_is_the_benchmark_report():
    """docs/performance.md's table is a copy of benchmarks/results.md (made by benchmarks.run_all), not hand-typed."""
    page = (REPO / "docs" / "performance.md").read_text()
    start = page.index("<!-- performance-table: copied from benchmarks/results.md -->\n")
    table = page[page.index("\n", start) + 1:page.index("<!-- /performance-table -->")]
    assert sum(line.startswith("| ") for line in table.splitlines()) == 6  # header and targets 1 to 5
    assert table.strip() in (REPO / "benchmarks" / "results.md").read_text()
