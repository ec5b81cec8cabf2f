"""Smoke test of the benchmarks: every one runs at tiny sizes and the report is written.

Checks that they work, not the targets (speed is measured by `python -m benchmarks.run_all`, not
asserted here). About two minutes, most of it the DVC benchmark's pipeline runs.
"""

import json
import sys

from conftest import REPO, run

BENCHMARKS = ["input_vs_compute", "tfrecords_vs_folders", "conversion_scaling", "incremental_dvc", "memory"]


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
