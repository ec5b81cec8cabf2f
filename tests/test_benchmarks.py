"""Smoke test of the benchmarks: every one runs at tiny sizes and the report is written.

Checks that they work, not the targets (speed is measured by `python -m benchmarks.run_all`, not
asserted here). `--smoke` runs them all in one process at their smallest sizes: about a minute on 2 busy
cores; the two inference benchmarks, which start a model server each, about a minute more (`-k inference`).
"""

import io
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.run_all import BENCHMARKS, SPEED_FLAGS, cpu_description, performance_table
from conftest import REPO, VENV_BIN, run
from pneumonia.config import load_params

SERVED = ["inference", "inference_ensemble"]  # each starts a model server
WITHOUT_SERVER = [name for name in BENCHMARKS if name not in SERVED]


def smoke_report(out, sample_zip, benchmarks: list[str]) -> dict:
    run([sys.executable, "-m", "benchmarks.run_all", "--smoke", "--only", *benchmarks, "--out", str(out),
         "--sample", str(sample_zip)], REPO)
    return json.loads((out / "results.json").read_text())


@pytest.mark.e2e
def test_every_benchmark_runs_and_writes_the_report(tmp_path, sample_zip):
    """All but the inference ones, which have their own test below (they start a model server)."""
    report = smoke_report(tmp_path, sample_zip, WITHOUT_SERVER)
    assert sorted(report["results"]) == sorted(WITHOUT_SERVER)
    for name, result in report["results"].items():
        assert "error" not in result, f"{name} failed:\n{result['error']}"
        assert isinstance(result["met"], bool) and result["measured"], name
        assert result["load_average"]["before"] >= 0, name
    assert report["machine"]["cores"] >= 1 and report["machine"]["versions"]["tensorflow"]
    assert set(report["machine"]["cpu_flags"]) <= set(SPEED_FLAGS)
    assert cpu_description(report["machine"]) in (tmp_path / "results.md").read_text()
    assert report["results"]["incremental_dvc"]["noop_up_to_date"]
    dvc = report["results"]["incremental_dvc"]  # smoke: the data stages without TensorFlow, no experiment
    assert dvc["first_repro"]["stages_run"] == ["download", "prepare", "class_weights"] and not dvc["experiment_run"]
    assert report["results"]["memory"]["images"]["2x"] == 2 * report["results"]["memory"]["images"]["1x"]

    table = (tmp_path / "results.md").read_text()
    assert "python -m benchmarks.run_all --smoke" in table
    assert [line.split(":")[0] for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()] == [
        f"| {BENCHMARKS[name]}" for name in WITHOUT_SERVER]
    speed = report["results"]["training_speed"]
    assert speed["variants"]["default"]["training_gflops_per_image"] > 0
    assert speed["peak_gflops_per_second"]["float32"]["conv3x3"] > 0
    assert "| default | " in table  # the speed variants' table


@pytest.mark.e2e
def test_inference_benchmarks_time_predict_evaluate_and_the_served_model_and_ensemble(tmp_path, sample_zip):
    results = smoke_report(tmp_path, sample_zip, SERVED)["results"]
    rows = (tmp_path / "results.md").read_text().splitlines()
    for name, members in zip(SERVED, (1, 2), strict=True):
        result = results[name]
        assert "error" not in result, result["error"]
        assert isinstance(result["met"], bool) and result["measured"] and result["load_average"]["before"] >= 0
        assert result["members"] == members and ("ensemble of 2" in result["target"]) == (members == 2)
        rates = result["images_per_second"]
        assert set(rates) == {"training", "predict_before", "predict", "evaluate"} and min(rates.values()) > 0
        assert set(result["ratios_to_training"]) == {"predict", "evaluate"}
        for clients, level in result["served"]["clients"].items():  # every request answered 200, else it fails
            assert level["requests"] >= int(clients) and 0 < level["p50_ms"] <= level["p99_ms"], clients
            assert level["images_per_second"] > 0, clients
        assert 0 < min(result["startup"]["onnx"]["cpu_seconds"])  # one-image predict with ONNX Runtime, timed
        assert sum(line.startswith(f"| {BENCHMARKS[name]}:") for line in rows) == 1


@pytest.mark.e2e
def test_external_validity_runs_the_pipeline_and_tabulates_external_and_in_distribution(tmp_path):
    """The script behind the README's results table, on synthetic data and a synthetic external site."""
    run([sys.executable, "-m", "benchmarks.external_validity", "--smoke", "--profiles", "default", "--seeds", "42",
         "--out", str(tmp_path), "--keep-models", str(tmp_path / "kept")], REPO)

    report = json.loads((tmp_path / "external_validity.json").read_text())
    [result] = report["runs"]
    assert (result["profile"], result["seed"]) == ("default", 42) and result["epochs_trained"] == 1
    for split in ("test", "external"):
        for name, (low, high) in result[split]["ci95"].items():
            assert low <= result[split][name] <= high, (split, name)
    assert {"youden", "sensitivity@0.95", "0.5"} <= result["rules"].keys()
    for point in (result["site_labelled_youden"], result["batch_norm_adapted"], result["prior_adjusted"]):
        assert 0 <= point["sensitivity"] <= 1 and 0 <= point["specificity"] <= 1

    table = (tmp_path / "external_validity.md").read_text()
    assert sum(line.startswith("| default | 42 |") for line in table.splitlines()) == 2  # summary and per-run rows
    assert "python -m benchmarks.external_validity --smoke" in table
    assert f"Trained on {result['cpu']}: default 42." in table  # a seed trains another model on another CPU model

    # The levers that need no training, on the kept model: each rule and number of views a row of its own.
    # This one and the calibration below run here, not as processes of their own: a TensorFlow import each saved.
    from benchmarks import calibration, prediction_levers

    prediction_levers.main(["--models", str(tmp_path / "kept"), "--profile", "default", "--rules", "youden",
                            "sensitivity@0.9", "--out", str(tmp_path)])
    levers = json.loads((tmp_path / "prediction_levers-default.json").read_text())
    assert [(row["rule"], row["views"]) for row in levers["rows"]] == [
        (rule, views) for rule in ("youden", "sensitivity@0.9") for views in levers["views"]]
    for row in levers["rows"]:
        assert row["members"] == [42] and 0 <= row["specificity"] <= 1 and 0 <= row["threshold"] <= 1
    assert "| sensitivity@0.9 | 1 | 9 |" in (tmp_path / "prediction_levers-default.md").read_text()

    # Calibration on the kept model: each method fitted on validation, scored on the external set.
    calibration.main(["--models", str(tmp_path / "kept"), "--profile", "default", "--out", str(tmp_path)])
    calibration = json.loads((tmp_path / "calibration-default.json").read_text())
    [methods] = calibration["seeds"].values()
    assert list(methods) == ["none", "temperature", "platt"]
    evaluated = methods[load_params(REPO / "params.yaml").evaluate.calibration]  # as the evaluate stage calibrated
    assert evaluated["ece"] == pytest.approx(result["external"]["ece"], abs=0.01)
    for found in methods.values():
        assert found["ece_ci95"][0] <= found["ece"] <= found["ece_ci95"][1] and 0 < found["threshold"] < 1
        assert found["roc_auc"] == pytest.approx(methods["none"]["roc_auc"])  # calibration keeps the ranking
    assert "| 42 | platt |" in (tmp_path / "calibration-default.md").read_text()

    # The adaptations on the kept model, for a site whose every X-ray went through a gamma curve
    from benchmarks import site_adaptation

    with pytest.raises(SystemExit) as refused:
        site_adaptation.main(["--models", str(tmp_path / "kept"), "--profile", "default", "--gamma", "0"])
    assert refused.value.code == 2
    site_adaptation.main(["--models", str(tmp_path / "kept"), "--profile", "default", "--gamma", "0.5",
                          "--halvings", "1", "--out", str(tmp_path)])
    toned = json.loads((tmp_path / "site_adaptation-default-gamma_0.5.json").read_text())
    assert toned["gamma"] == 0.5 and toned["command"].endswith("--profile default --gamma 0.5 --halvings 1")
    [found] = toned["seeds"].values()
    for name in ("unadapted", "batch_norm_adapted", "prior_adjusted"):
        assert 0 <= found[name]["specificity"] <= 1 and 0 <= found[name]["roc_auc"] <= 1, name
    assert "every external image through the gamma curve 0.5" in (
        tmp_path / "site_adaptation-default-gamma_0.5.md").read_text()


def test_readme_results_table_is_the_external_validity_report():
    """The README shows the benchmark's own summary (of benchmarks/external_validity.json), not hand-typed figures."""
    from benchmarks.external_validity import markdown

    report = json.loads((REPO / "benchmarks" / "external_validity.json").read_text())
    summary = markdown(report, summary_only=True)
    assert summary.splitlines()[4] in (REPO / "benchmarks" / "external_validity.md").read_text()  # the first row
    assert summary.strip() in (REPO / "README.md").read_text()


def test_performance_page_table_is_the_benchmark_report():
    """docs/performance.md's table is a copy of benchmarks/results.md (made by benchmarks.run_all), not hand-typed."""
    page = (REPO / "docs" / "performance.md").read_text()
    start = page.index("<!-- performance-table: made by python -m benchmarks.run_all -->\n")
    table = page[page.index("\n", start) + 1:page.index("<!-- /performance-table -->")]
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(BENCHMARKS)  # header and targets
    rows = "\n".join(line for line in table.splitlines() if line.startswith("|"))
    assert rows in (REPO / "benchmarks" / "results.md").read_text()
    report = json.loads((REPO / "benchmarks" / "results.json").read_text())
    assert table.strip() == performance_table(report, yaml.safe_load((REPO / "params.yaml").read_text())).strip(), (
        "docs/performance.md's table is not results.json's against today's params.yaml: "
        "`python -m benchmarks.run_all --copies`")


def test_readme_performance_summary_is_the_benchmark_report_of_todays_default():
    """The README's speed figures are results.json's, measured with params.yaml's default as it is: a default
    changed (a MEASURED_WITH key of params.yaml) fails here until the benchmarks are run again."""
    from benchmarks.run_all import IN_README, SUMMARY_MARKERS, readme_summary, staleness

    report = json.loads((REPO / "benchmarks" / "results.json").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert not report["smoke"] and not staleness(report, params), (
        f"{staleness(report, params)} The README would present figures of another default.")
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index(SUMMARY_MARKERS[0]) + len(SUMMARY_MARKERS[0]):readme.index(SUMMARY_MARKERS[1])]
    assert block.strip() == readme_summary(report, params).strip(), (
        "the README's speed figures are not results.json's: `python -m benchmarks.run_all --copies`")
    assert all(f"- {report['results'][name]['target']}: " in block for name in IN_README)


def test_speed_figures_say_when_they_are_of_another_default():
    """A report records the params.yaml it was measured with; its copies flag figures of another default,
    naming what changed, and nothing when only what they do not depend on changed."""
    from benchmarks.run_all import readme_summary, staleness

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    report = json.loads((REPO / "benchmarks" / "results.json").read_text())
    assert staleness({**report, "params": params}, params) == ""
    assert "another default" not in readme_summary({**report, "params": params}, params)
    other_threshold = {**params, "evaluate": {**params["evaluate"], "threshold": 0.5}}
    assert staleness({**report, "params": other_threshold}, params) == ""
    before = {**params, "train": {**params["train"], "weight_averaging": "none"}}
    assert "changed since: train.weight_averaging" in staleness({**report, "params": before}, params)
    assert "another default" in readme_summary({**report, "params": before}, params)
    renamed = {**params, "train": {("old_name" if key == "seed" else key): value
                                   for key, value in params["train"].items()}}
    assert "1 keys added or renamed" in staleness({**report, "params": renamed}, params)  # old_name; seed is as before
    # A setting added since, off (its schema default): the figures were measured with it; on, they were not
    without = {**params, "train": {key: value for key, value in params["train"].items() if key != "weight_decay"}}
    assert params["train"]["weight_decay"] == 0 and staleness({**report, "params": without}, params) == ""
    decayed = {**params, "train": {**params["train"], "weight_decay": 0.05}}
    assert "1 keys added or renamed" in staleness({**report, "params": without}, decayed)
    unrecorded = {key: value for key, value in report.items() if key != "params"}
    assert "measured before reports recorded their params" in staleness(unrecorded, params)


@pytest.mark.e2e
def test_gpu_check_runs_on_the_cpu_and_writes_its_report(tmp_path):
    """benchmarks/gpu_check.py --cpu: the GPU check's runs at tiny sizes on the CPU (not yet run on a GPU)."""
    run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--out", str(tmp_path)], REPO)

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu" and report["devices"]["tensorflow"] and report["machine"]["cores"] >= 1
    assert set(report["devices"]["auto_precision"]) == {"custom_cnn", "mobilenetv2"}
    runs = report["runs"]
    # No reference process on the CPU: the float32 run is the CPU's training (cross-process determinism is
    # test_training.py::test_same_seed_gives_the_same_model_and_another_seed_does_not)
    assert [(r["model"], r["precision"], r["reference"]) for r in runs] == [
        ("custom_cnn", "float32", False), ("custom_cnn", "mixed_bfloat16", False), ("mobilenetv2", "float32", False)]
    for row in runs:
        assert "error" not in row, row["error"]
        assert row["device"] == "cpu" and row["epochs"] == report["settings"]["epochs"] == len(row["val_auc"])
        assert all(0 <= auc <= 1 for auc in row["val_auc"]) and row["train_seconds"] > 0 and row["peak_memory_mb"] > 0
        assert min(row["images_per_second"].values()) > 0
        assert row["step_ms"]["training"] > 0 and row["step_ms"]["compute"] > 0
        assert row["step_ms"]["waiting_for_input"] >= 0
    check = report["auc_check"]
    [compared] = check["runs"]
    assert compared["precision"] == "mixed_bfloat16" and compared["reference_val_auc"] == max(runs[0]["val_auc"])

    page = (tmp_path / "gpu_check.md").read_text()
    assert "python -m benchmarks.gpu_check --cpu" in page
    assert sum(line.startswith("| custom_cnn | cpu | ") for line in page.splitlines()) == 2
    assert "- cpu mixed_bfloat16: " in page and "failed" not in page


@pytest.mark.e2e
def test_gpu_check_jax_mode_trains_the_recipe_under_jax_without_tensorflow(tmp_path):
    """benchmarks/gpu_check.py --jax --cpu: the model, recipe and weight averaging under Keras's JAX backend on the
    CPU, as on a GPU machine that has no TensorFlow: importing TensorFlow fails in its processes here."""
    blocker = tmp_path / "without_tensorflow" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('the JAX mode imported TensorFlow')\n")
    # nor the TFRecord writer's CRC library, which the GPU machine lacks too (gpu_check_wheels.sh carries no such wheel)
    (blocker.parent / "google_crc32c.py").write_text("raise ImportError('the JAX mode imported google_crc32c')\n")
    jax_site = VENV_BIN.parent / "jax"  # setup.sh installs jax there, apart (pyproject.toml's `jax` extra says why)
    assert (jax_site / "jax").is_dir(), f"no jax in {jax_site}: run `bash setup.sh`"
    run([sys.executable, "-m", "benchmarks.gpu_check", "--jax", "--cpu", "--out", str(tmp_path)], REPO,
        PYTHONPATH=os.pathsep.join([str(blocker.parent), str(jax_site)]))

    report = json.loads((tmp_path / "gpu_check_jax.json").read_text())
    assert report["mode"] == "cpu" and report["machine"]["versions"]["jax"]
    runs = report["runs"]
    assert [(row["precision"], row["reference"]) for row in runs] == [("mixed_float16", False), ("float32", True)]
    for row in runs:
        assert "error" not in row, row["error"]
        assert row["platform"] == "cpu" and row["jit_compile"]  # XLA compiles the step, augmentation included
        assert row["epochs"] == report["settings"]["epochs"] == len(row["val_auc"]) == len(row["val_loss"])
        assert all(0 <= auc <= 1 for auc in row["val_auc"]) and row["train_seconds"] > 0
    assert [speed["batch_size"] for speed in runs[0]["speed"]] == report["settings"]["batch_sizes"]
    assert min(speed["images_per_second"] for speed in runs[0]["speed"]) > 0
    [compared] = report["auc_check"]["runs"]
    assert compared["precision"] == "mixed_float16" and compared["reference_val_auc"] == max(runs[1]["val_auc"])

    page = (tmp_path / "gpu_check_jax.md").read_text()
    assert "python -m benchmarks.gpu_check --jax --cpu" in page and "not TensorFlow's GPU path" in page
    assert "| cpu | cpu | mixed_float16 | True |" in page and "- cpu mixed_float16: " in page


@pytest.mark.slow
def test_gpu_check_wrapper_says_what_to_do_when_it_cannot_install(tmp_path):
    """No package index and no usable wheels: a clear message, exit 1, and no report."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    result = run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out"), "--wheels", str(wheels)], REPO,
                 check=False, VENV=str(tmp_path / "venv"), PYTHON=sys.executable, PIP_CONFIG_FILE=os.devnull,
                 PIP_FIND_LINKS=str(wheels))
    assert result.returncode == 1, result.stderr
    assert f"could not install the project with tensorflow[and-cuda] from the wheels in {wheels}" in result.stderr
    assert "pip download -d DIR -c requirements.lock '.[gpu]' setuptools" in result.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()


@pytest.mark.slow  # two small self-trainings: 10 s
def test_adaptation_scores_fit_on_one_half_of_the_patients_and_score_the_other(monkeypatch):
    """benchmarks.external_validity.adaptation_scores (external_validity's runs and benchmarks.site_adaptation):
    every adaptation is fitted on the images of half the patients, never on those it is scored on."""
    import keras
    import numpy as np

    from benchmarks.external_validity import adaptation_scores
    from pneumonia import adaptation
    from test_adaptation import bright_and_dark, site_model

    images = bright_and_dark(80)
    labels = (np.arange(80) >= 40).astype(int)
    patients = [f"patient{index // 2}" for index in range(80)]  # two images a patient
    images[:, 0, 0, 0] = np.arange(80)  # each image's index, to see which images each step saw
    events = []  # ("fit" | "predict", the indices of the images)

    def seen(on) -> frozenset:
        return frozenset(int(value) for value in np.asarray(on)[:, 0, 0, 0])

    def recording(original):
        def fitted_on(model, on, *args, **kwargs):
            events.append(("fit", seen(on)))
            return original(model, on, *args, **kwargs)
        return fitted_on

    for name in ("adapt_batch_norm", "self_train"):
        monkeypatch.setattr(adaptation, name, recording(getattr(adaptation, name)))
    predict = keras.Model.predict

    def recording_predict(model, on, *args, **kwargs):
        events.append(("predict", seen(on)))
        return predict(model, on, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "predict", recording_predict)

    found = adaptation_scores(site_model(), 0.3, labels, images, patients, halvings=1)
    everything = frozenset(range(80))
    assert events[0] == ("predict", everything)  # the model unadapted, once
    halves = [events[1 + 6 * index:7 + 6 * index] for index in range(2)]  # 1 halving, both ways
    assert len(events) == 1 + 6 * 2
    for (_, fitted), *steps in halves:
        scored = everything - fitted
        # batch norm fitted, scored; self-training fitted (its batch norm too, its pseudo-labels), scored
        assert steps == [("predict", scored), ("fit", fitted), ("fit", fitted), ("predict", fitted),
                         ("predict", scored)]
        assert {patients[index] for index in fitted}.isdisjoint(patients[index] for index in scored)
        assert 30 <= len(fitted) <= 50
    assert halves[0][0][1] == everything - halves[1][0][1]  # both ways of one halving
    assert found["self_training_refused"] == 0 and found["self_training_seconds"] > 0
    for name in ("unadapted", "batch_norm_adapted", "prior_adjusted", "self_trained"):
        assert set(found[name]) >= {"sensitivity", "specificity", "accuracy", "roc_auc"}
        assert all(0 <= value <= 1 for value in found[name].values()), name


def test_adaptation_scores_leave_out_what_a_nested_backbone_cannot_do():
    """A backbone profile (mobilenetv2_scratch) is scored unadapted and prior-adjusted; batch-norm adaptation and
    self-training, implemented for flat networks, are None (n/a in the report), not a crash after its training."""
    import numpy as np

    from benchmarks.external_validity import adaptation_scores
    from pneumonia.config import ModelConfig
    from pneumonia.models.build import build_model

    images = np.random.default_rng(0).uniform(0, 255, (40, 32, 32, 3)).astype(np.float32)
    labels = (np.arange(40) >= 20).astype(int)
    model = build_model(ModelConfig(crop=0, name="mobilenetv2", weights="none"), 32)
    found = adaptation_scores(model, 0.5, labels, images, [f"patient{index // 2}" for index in range(40)], 1)
    assert found["batch_norm_adapted"] is None and found["self_trained"] is None
    assert found["self_training_refused"] == 0 and found["self_training_seconds"] is None
    for name in ("unadapted", "prior_adjusted"):
        assert set(found[name]) >= {"sensitivity", "specificity", "accuracy", "roc_auc"}


def test_ood_benchmark_scores_each_method_on_each_group_and_writes_its_report(tmp_path, synthetic_data):
    """benchmarks/ood.py at its smallest: an untrained model on the synthetic set, a zip of 20 stand-in external
    images; every group of inputs that are not chest X-rays is scored by every method."""
    import zipfile

    from archives import jpeg

    external = tmp_path / "external.zip"
    with zipfile.ZipFile(external, "w") as archive:
        for index in range(20):
            archive.writestr(f"external/NORMAL/{index}.jpeg", jpeg(index))
    run([sys.executable, "-m", "benchmarks.ood", "--smoke", "--tfrecords", str(synthetic_data / "data/tfrecords"),
         "--external", str(external), "--out", str(tmp_path)], REPO)
    report = json.loads((tmp_path / "ood-smoke.json").read_text())
    assert set(report["methods"]) == {"penultimate layer (the baseline)", "pooled features", "layout thumbnail",
                                      "layout + pooled features (pneumonia.ood)"}
    for method in report["methods"].values():
        groups = method["groups"]
        assert groups["external"]["images"] == 20 and groups["inverted"]["images"] == 40
        assert all(0 <= row["flagged"] <= 1 and 0 <= row.get("roc_auc", 0) <= 1 for row in groups.values())
    assert report["cost"]["predict"]["with"] > 0 and report["cost"]["model"]["with"] > 0
    assert "python -m benchmarks.ood --smoke" in (tmp_path / "ood-smoke.md").read_text()


def xray_project_and_external_zip(root: Path, count: int, splits: tuple[str, ...]) -> tuple[Path, Path]:
    """`count` X-rays of the committed sample (half of each class) as PNG files of a project, listed in its
    manifests of `splits`, and as an external zip in NORMAL/ and PNEUMONIA/ folders: (manifests folder, zip)."""
    import zipfile

    from dicoms import png_bytes, sample_xrays
    from pneumonia.data.manifest import Record, write_manifest

    project, rows = root / "project", []
    (project / "data/manifests").mkdir(parents=True)
    with zipfile.ZipFile(root / "external.zip", "w") as external:
        for index, (name, grey) in enumerate(sample_xrays(count, width=96)):
            label = "PNEUMONIA" if index >= count // 2 else "NORMAL"
            (project / f"{name}.png").write_bytes(png_bytes(grey))
            rows.append(Record(f"{name}.png", int(label == "PNEUMONIA"), name, "0" * 64, "train"))
            external.writestr(f"external/{label}/{name}.png", png_bytes(grey))
    for split in splits:
        write_manifest(project / f"data/manifests/{split}.csv", rows)
    return project / "data/manifests", root / "external.zip"


def test_small_images_benchmark_scores_each_size_and_says_which_the_size_check_flags(tmp_path):
    """benchmarks/small_images.py at its smallest: an untrained 32 px model with its bundle, four X-rays of the
    committed sample as a validation manifest and as an external zip, at their own size and at 24 and 48 px."""
    from PIL import Image

    from benchmarks import small_images
    from bundles import write_settings
    from pneumonia.config import ModelConfig
    from pneumonia.models.build import build_model

    model = build_model(ModelConfig(crop=0), 32)
    (tmp_path / "models").mkdir()
    model.save(tmp_path / "models/model.keras")
    write_settings(tmp_path / "models/model.keras", 0.5, model=model)
    manifests, external = xray_project_and_external_zip(tmp_path, 4, ("val",))
    small_images.main(["--model", str(tmp_path / "models"), "--manifest", str(manifests / "val.csv"),
                       "--external", str(external), "--sides", "48", "24", "--out", str(tmp_path)])

    report = json.loads((tmp_path / "small_images.json").read_text())
    assert report["image_size"] == 32 and set(report["sets"]) == {"validation", "external"}
    for rows in report["sets"].values():
        assert [row["side"] for row in rows] == [None, 48, 24] and all(row["images"] == 4 for row in rows)
        assert [row["size_flagged"] for row in rows] == [0.0, 0.0, 1.0]  # under 32 px only
        assert all(0 <= row[key] <= 1 for row in rows for key in ("normal_called_pneumonia", "pneumonia_missed",
                                                                  "ood_flagged", "mean_probability_normal"))
    assert Image.open(io.BytesIO(small_images.shrunk_png(Image.new("L", (96, 60)), 24))).size == (38, 24)
    assert "python -m benchmarks.small_images --model" in (tmp_path / "small_images.md").read_text()


def test_compact_sample_report_says_which_runs_are_healthy():
    """benchmarks.compact_sample (issue 36): a newcomer's first run is healthy with in-distribution ROC AUC >= 0.98
    and a threshold in [0.1, 0.9]; runs recorded before ECE was reported show n/a."""
    from benchmarks.compact_sample import healthy, markdown

    run_of = {"seed": 42, "roc_auc": 0.985, "sensitivity": 0.9, "specificity": 0.95, "ece": 0.04, "threshold": 0.5,
              "best_epoch": 20, "epochs_trained": 28, "train_seconds": 300, "load_average": 2.0}
    low_threshold = {**run_of, "seed": 1, "threshold": 0.041}
    low_auc = {**run_of, "seed": 2, "roc_auc": 0.978}
    assert healthy(run_of) and not healthy(low_threshold) and not healthy(low_auc)
    older = {key: value for key, value in run_of.items() if key != "ece"}
    report = {"groups": {"default": {"overrides": [], "runs": [run_of, low_threshold, low_auc, older]}},
              "date": "2026-12-05", "machine": {"cpu": "test CPU", "cores": 2}}
    table = markdown(report)
    assert "| default | `none` | 42 | 0.985 | 0.900 | 0.950 | 0.040 | 0.500 | 20 / 28 | 5.0 min | 2.0 | yes |" in table
    assert "| 0.950 | n/a | 0.500 |" in table and "| 2 of 4 |" in table


def test_paired_comparison_gives_each_profiles_models_their_own_images(monkeypatch, tmp_path):
    """A lever may change data.image_size (profile 160px): each profile's models predict the images kept with that
    profile, not the first profile's (a 160 px model was handed 128 px images)."""
    import functools

    import numpy as np

    import pneumonia.models.build
    from benchmarks import paired

    labels = np.array([0, 1] * 10)
    names = [f"person{i}_virus_{i}.jpeg" for i in range(len(labels))]
    left_bright = np.zeros((8, 8, 3))
    left_bright[:, :4] = 255

    def kept_split(folder: Path, split: str):
        size = 160 if "/b/" in folder.as_posix() else 128
        return labels, names, np.zeros((len(labels), size, size, 3))

    seen = set()

    def view_probabilities(model: str, images, views: int):
        seen.add((model, images.shape[1]))
        return np.linspace(0.01, 0.99, len(images))

    monkeypatch.setattr(paired, "kept_split", kept_split)
    monkeypatch.setattr(paired, "kept_seeds", lambda models, profile: [42])
    monkeypatch.setattr(paired, "paired", functools.partial(paired.paired, resamples=20))
    monkeypatch.setattr(paired, "view_probabilities", view_probabilities)
    monkeypatch.setattr(pneumonia.models.build, "load_model", lambda path: path.stem.split("-")[0])  # the profile
    monkeypatch.setattr(sys, "argv", ["paired", "--models", str(tmp_path), "--profiles", "a", "b", "--out",
                                      str(tmp_path)])
    paired.main()
    assert seen == {("a", 128), ("b", 160)}
    assert (tmp_path / "paired-a-b.md").is_file()

    # --mirrored: the external images (only they) reach the models mirrored left to right
    sides = []
    monkeypatch.setattr(paired, "kept_split", lambda folder, split: (labels, names, np.stack([left_bright] * 20)))
    monkeypatch.setattr(paired, "view_probabilities", lambda model, images, views: sides.append(
        "left" if images[0, 0, 0, 0] > images[0, 0, -1, 0] else "right") or np.linspace(0.01, 0.99, len(images)))
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--mirrored"])
    paired.main()
    assert sides == ["left", "right"] * 2  # per profile: validation as stored, then the external set mirrored
    assert "external set mirrored left to right" in (tmp_path / "paired-a-b-mirrored.md").read_text()


def test_paired_comparison_cancels_the_images_noise_and_reports_both_halves():
    """benchmarks.paired: B against A on the same images. A model against itself differs by exactly 0 on every
    resample; a model that ranks better gains ROC AUC with an interval above 0, on both halves."""
    import numpy as np

    from benchmarks.paired import COMPARED, markdown, paired

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(60), np.ones(90)].astype(int)
    noisy = np.clip(labels * 0.3 + rng.uniform(0, 0.7, len(labels)), 0, 1)
    sharper = np.clip(labels * 0.6 + rng.uniform(0, 0.4, len(labels)), 0, 1)
    halves = np.arange(len(labels)) % 2

    same = paired(labels, (noisy, 0.5), (noisy, 0.5), halves, resamples=50)
    assert all(same["difference_ci95"][name] == [0, 0] and same["difference"][name] == 0 for name in COMPARED)
    better = paired(labels, (noisy, 0.5), (sharper, 0.5), halves, resamples=50)
    assert better["difference_ci95"]["roc_auc"][0] > 0 and all(half["roc_auc"] > 0 for half in better["halves"])
    assert better["second"]["roc_auc"] - better["first"]["roc_auc"] == better["difference"]["roc_auc"]

    report = {"profiles": ["a", "b"], "rule": "youden", "images": len(labels), "seeds": {"42": better, "1": same},
              "command": "python -m benchmarks.paired", "date": "today", "machine": {"cpu": "cpu", "cores": 2},
              "load_average": {"before": 0, "after": 0}}
    table = markdown(report)
    assert "| roc_auc | " in table and "| 1 / 0 of 2 |" in table  # seed 42 gains, seed 1 neither


def test_each_benchmark_experiment_starts_from_the_committed_params(tmp_path):
    """`dvc exp run -S` leaves its values in the workspace's params.yaml: the benchmarks' runs of one profile
    after another (external_validity, compact_sample) must not inherit the one before's (a default run once
    trained with the previous profile's model.stem)."""
    import harness

    (tmp_path / "params.yaml").write_text("model: {stem: full, width: 1}\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"record": {
        "cmd": "python -c \"import yaml; print(yaml.safe_load(open('params.yaml'))['model'], file=open('ran', 'w'))\"",
        "params": ["model"], "outs": [{"ran": {"cache": False}}]}}}))
    harness.run(["git", "init", "-q"], tmp_path)
    harness.run(["dvc", "init", "-q"], tmp_path)
    harness.commit_all(tmp_path)

    harness.run_experiment(tmp_path, ["-S", "model.stem=strided"])
    assert (tmp_path / "ran").read_text().strip() == "{'stem': 'strided', 'width': 1}"
    harness.run_experiment(tmp_path, ["-S", "model.width=2"])
    assert (tmp_path / "ran").read_text().strip() == "{'stem': 'full', 'width': 2}"


def test_detail_check_benchmark_scores_each_change_and_what_the_check_flags(tmp_path):
    """benchmarks/detail_check.py at its smallest: an untrained 32 px model whose bundle's checks are fitted on six
    X-rays of the committed sample, the same X-rays as a validation manifest and an external zip, each change."""
    import numpy as np

    from benchmarks import detail_check
    from bundles import write_settings
    from pneumonia.classifier import model_input
    from pneumonia.config import ModelConfig
    from pneumonia.models.build import build_model

    manifests, external = xray_project_and_external_zip(tmp_path, 6, ("val",))
    model = build_model(ModelConfig(crop=0), 32)
    (tmp_path / "models").mkdir()
    model.save(tmp_path / "models/model.keras")
    inputs = np.stack([model_input(path, 32, 95) for path in sorted((manifests.parents[1]).glob("*.png"))] * 2)
    write_settings(tmp_path / "models/model.keras", 0.5, model=model, images=inputs)
    detail_check.main(["--model", str(tmp_path / "models"), "--manifest", str(manifests / "val.csv"),
                       "--external", str(external), "--out", str(tmp_path)])

    report = json.loads((tmp_path / "detail_check.json").read_text())
    assert report["image_size"] == 32 and set(report["sets"]) == {"validation", "external"}
    assert report["band"][0] < report["band"][1]
    for rows in report["sets"].values():
        assert [(row["change"], row["amount"]) for row in rows] == [row[::2] for row in detail_check.CHANGES]
        assert rows[0]["mean_moved"] == 0 and all(row["images"] == 6 for row in rows)
        assert all(0 <= row[key] <= 1 for row in rows for key in ("normal_called_pneumonia", "pneumonia_missed",
                                                                  "blurred", "noisy", "ood_flagged"))
        strongest = {row["change"]: row for row in rows}  # the last of each change, its strongest
        # (these 96 px images are already noisy at 32 px: the X-rays' noise is measured in test_model_bundle.py)
        assert strongest["blur"]["blurred"] == strongest["enlarged"]["blurred"] == 1 and rows[0]["blurred"] == 0
    assert "python -m benchmarks.detail_check --model" in (tmp_path / "detail_check.md").read_text()


@pytest.mark.slow  # loads four models, predicts six curves of twelve images
def test_tone_curves_benchmark_pairs_each_arms_models_by_seed(tmp_path, capsys):
    """benchmarks/tone_curves.py at its smallest: two arms of two seeds, from two small random 32 px networks, six
    X-rays of the committed sample as a validation manifest and as an external zip, each curve."""
    import keras

    from benchmarks import tone_curves

    for wrong, message in ((["first", "one", str(tmp_path)], "the seed is a whole number"),
                           (["first", "1", str(tmp_path / "missing.keras")], "no such model file")):
        with pytest.raises(SystemExit) as refused:  # before reading any image
            tone_curves.main(["--model", *wrong, "--external", "", "--out", str(tmp_path)])
        assert refused.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "tone_curves.json").exists()
    manifests, external = xray_project_and_external_zip(tmp_path, 6, ("val",))
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((32, 32, 3))
        features = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
        outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(features))
        keras.Model(inputs, outputs).save(tmp_path / f"{seed}.keras")
    # two arms of two seeds from the two models, swapped: the second arm's differences are the first's negated
    arguments = [argument for arm, seed, model in (("first", 1, 1), ("second", 1, 2), ("first", 2, 2), ("second", 2, 1))
                 for argument in ("--model", arm, str(seed), str(tmp_path / f"{model}.keras"))]
    tone_curves.main([*arguments, "--manifest", str(manifests / "val.csv"), "--external", str(external),
                      "--out", str(tmp_path)])

    report = json.loads((tmp_path / "tone_curves.json").read_text())
    assert report["arms"] == ["first", "second"] and set(report["summary"]) == {"validation", "external"}
    for model in report["models"]:
        for rows in model["sets"].values():
            assert [row["curve"] for row in rows] == [name for name, _ in tone_curves.CURVES]
            assert rows[0]["mean_moved"] == 0 and all(0 <= row["roc_auc"] <= 1 for row in rows)
            assert any(row["mean_moved"] > 0 for row in rows)  # a curve reaches the model
    by_arm = {(row["arm"], row["curve"]): row for row in report["summary"]["external"]}
    first, second = by_arm["first", "gamma 2"], by_arm["second", "gamma 2"]
    assert first["seeds"] == second["seeds"] == [1, 2] and first["roc_auc_vs_first"] == [0, 0]
    gamma_2 = [name for name, _ in tone_curves.CURVES].index("gamma 2")
    of = {(model["arm"], model["seed"]): model["sets"]["external"][gamma_2] for model in report["models"]}
    assert second["roc_auc_vs_first"] == pytest.approx([of["second", s]["roc_auc"] - of["first", s]["roc_auc"]
                                                        for s in (1, 2)])
    assert second["roc_auc_vs_first"][0] == pytest.approx(-second["roc_auc_vs_first"][1])
    assert "python -m benchmarks.tone_curves --model first 1" in (tmp_path / "tone_curves.md").read_text()
    # 255 (x / 255)^g, rounded: mid-grey 128 darkened to 64 by g = 2, 64 brightened to 128 by g = 0.5
    assert [tone_curves.gamma_curve(g)[x] for g, x in ((2, 128), (0.5, 64), (2, 255), (0.5, 0))] == [64, 128, 255, 0]


def test_mirror_check_benchmark_scores_each_set_as_stored_and_mirrored(tmp_path):
    """benchmarks/mirror_check.py at its smallest: twelve X-rays of the committed sample as a project's training and
    validation manifests and as an external zip. Mirroring negates the log-odds, so what is not flagged as stored is
    flagged once mirrored."""
    from benchmarks import mirror_check

    manifests, external = xray_project_and_external_zip(tmp_path, 12, ("train", "val"))
    mirror_check.main(["--manifests", str(manifests), "--external", str(external), "--limit", "10",
                       "--out", str(tmp_path)])

    report = json.loads((tmp_path / "mirror_check.json").read_text())
    assert report["fitted_on"] == 10 and set(report["sets"]) == {"validation", "external"}
    for row in report["sets"].values():
        assert row["images"] == 10 and row["flagged_as_stored"] + row["flagged_mirrored"] == pytest.approx(1)
    assert "python -m benchmarks.mirror_check --manifests" in (tmp_path / "mirror_check.md").read_text()
