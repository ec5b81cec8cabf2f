"""Target 4: `dvc repro` with nothing changed takes <= 3 s of wall time on the sample, and
`dvc exp run -S model.name=...` runs no data stage (download, prepare, tfrecords).

In a copy of the project (as the end-to-end tests make it) with the sample as data, one training
epoch and 88 px images (the no-op repro does not depend on the image size; the trainings are short):
a first full `dvc repro`, then `repeats` timed no-op repros, then an experiment
on another model; which stages ran is read from DVC's own output. The smoke run repros the data stages
up to class_weights only (none imports TensorFlow) and makes no experiment: it checks that the script works.
"""

import re
import shutil
import time
from pathlib import Path

import yaml

import harness
from benchmarks.common import Scale, load_during, main, median

TARGET_SECONDS = 3.0
DATA_STAGES = ("download", "prepare", "tfrecords")


def dvc(project: Path, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    output = harness.run(["dvc", *args], project).stdout
    return time.perf_counter() - started, output


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def run(workdir: Path, scale: Scale, sample_zip: Path) -> dict:
    project = workdir / "dvc-project"
    shutil.rmtree(project, ignore_errors=True)
    harness.copy_project(project)
    settings = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in scale.dvc_params)}
    harness.set_params(project, **settings, **{"data.local_path": str(sample_zip)})
    harness.commit_all(project)

    result: dict = {"params": list(scale.dvc_params), "experiment": [f"-S {item}" for item in scale.dvc_experiment],
                    "repro_target": scale.dvc_target or "every stage"}
    repro = ["repro", *([scale.dvc_target] if scale.dvc_target else [])]
    with load_during(result):
        seconds, output = dvc(project, *repro)
        result["first_repro"] = {"seconds": round(seconds, 1), "stages_run": stages_run(output)}
        harness.commit_all(project, "baseline")
        noop = [dvc(project, *repro) for _ in range(scale.repeats)]
        experiment = (dvc(project, "exp", "run", *(arg for item in scale.dvc_experiment for arg in ("-S", item)))
                      if scale.dvc_experiment else None)
    noop_seconds = median([seconds for seconds, _ in noop])
    up_to_date = all("Data and pipelines are up to date" in out and not stages_run(out) for _, out in noop)
    experiment_run = None
    if experiment:
        seconds, output = experiment
        experiment_run = {"seconds": round(seconds, 1), "stages_run": stages_run(output),
                          "stages_skipped": re.findall(r"Stage '([\w-]+)' didn't change, skipping", output),
                          "data_stages_run": [stage for stage in stages_run(output) if stage in DATA_STAGES]}
    ran = (f"experiment ran {', '.join(experiment_run['stages_run']) or 'nothing'}" if experiment_run
           else "no experiment")
    met = (noop_seconds <= TARGET_SECONDS and up_to_date and experiment_run is not None
           and not experiment_run["data_stages_run"])
    return {
        "target": f"no-op `dvc repro` <= {TARGET_SECONDS:g} s; `dvc exp run -S model.*` runs no data stage",
        "measured": f"no-op repro {noop_seconds:.2f} s; {ran}",
        "met": met,
        "noop_repro_seconds": round(noop_seconds, 2), "noop_repro_runs": [round(s, 2) for s, _ in noop],
        "noop_up_to_date": up_to_date, "experiment_run": experiment_run,
        **result,
    }


if __name__ == "__main__":
    main(run)
