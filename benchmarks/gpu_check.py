"""GPU check: does the pipeline's GPU path work, and what does it reach on one GPU (at most 8 minutes).

    bash benchmarks/gpu_check.sh OUT                   # bare machine: a venv with the `gpu` extra, then this
    python -m benchmarks.gpu_check --out OUT           # where the project and tensorflow[and-cuda] are installed
    python -m benchmarks.gpu_check --cpu --out OUT     # tiny sizes on a CPU, under a minute: checks that it works
    python -m benchmarks.gpu_check --jax --out OUT     # no TensorFlow: the model under Keras's JAX backend
                                                       # (benchmarks/gpu_check_jax.py)

Writes OUT/gpu_check.json and OUT/gpu_check.md (rewritten after each model, so a run stopped at its
time limit still leaves what it measured):

* the GPUs TensorFlow sees (name, compute capability), its CUDA and cuDNN build, and the precision
  `train.precision: auto` chooses for custom_cnn and for a backbone;
* custom_cnn (the default profile of params.yaml) and resnet50v2 from scratch (`model.weights: none`),
  each in float32 and mixed_float16 with `train.accelerator: gpu`, on the compact sample
  (data_sample/chest-xray-small.zip, what `dvc repro` runs on): the validation AUC per epoch, the
  training's seconds, then training images/s read from the TFRecords and on the same batches held
  in memory (benchmarks.input_vs_compute's measurement: the step time splits into compute and waiting
  for input), the input pipeline's own rate (batches read, no model) and the peak GPU memory;
* custom_cnn float32 once more on the CPU (`train.accelerator: cpu`, same seed and epochs): the GPU
  runs' validation AUC after the same epochs (the best epoch's, which the train stage keeps) must be
  within AUC_TOLERANCE of it.

Why the library and not `dvc exp run` in a copy of the project (as benchmarks.external_validity
does): each experiment would rerun the evaluate stage (bootstrap, Grad-CAM, the HTML report) and
start DVC and a TensorFlow process per stage, minutes that measure nothing asked here, and fit's
step times are not visible from outside. So the sample is extracted, prepared and written as
TFRecords once with the stages' own functions (benchmarks.common.prepared_sample, write_tfrecords),
and each run calls the train stage's own `pneumonia.training.fit.train` with params.yaml plus the
run's overrides, as `dvc exp run -S` would set them. Each model runs in a process of its own (the
precision policy, the visible devices and TensorFlow's determinism are per process), under a time
limit, so a crash or a hang costs one model, not the report.

Determinism: the default `train.deterministic: true` makes TensorFlow refuse ops that have no
deterministic GPU kernel. A model whose run fails so is run again with `train.deterministic: false`,
and the report says which op it was. Even deterministic, GPU and CPU do not compute alike (cuDNN's
and oneDNN's kernels sum in other orders, float16 rounds), so the two trainings part after the
first steps: hence a tolerance, not equality. How far apart such trainings end, measured on 2 CPU
cores (custom_cnn float32 against mixed_bfloat16, and seed 42 against 1, 10 epochs): the last epoch's
validation AUC 0.07 and 0.11 apart (it swings by 0.1 from one epoch to the next on 118 images), the
best epoch's 0.011 and 0.015: so the best epoch's is compared, within 0.03.

Time: each model's process stops at 4 minutes, and all of them together get 7.5 (budget_seconds),
so the check ends within 8 minutes of its start, the sample's preparation included; a model cut off
is reported as such. About 4 minutes are expected on one H200 with 16 cores (not yet run there).

`--cpu`: the same runs on the CPU at tiny sizes (40 px, batches of 8, a sixteenth of the sample, one
epoch, two timed steps): custom_cnn in float32 and mixed_bfloat16 (mixed_float16 is a GPU format;
bfloat16 is what `precision: auto` uses on CPUs), and mobilenetv2 in place of resnet50v2, float32
only (the same code path; resnet50v2 from scratch took minutes for ten steps on 2 cores). The float32
run is its own CPU reference (a second process would repeat it). Nothing is measured there: it shows the
script works.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import REPO, median, prepared_sample, quiet_tensorflow, timed, working_directory
from benchmarks.input_vs_compute import tfrecords_and_in_memory_rates

AUC_TOLERANCE = 0.03  # |GPU - CPU| best validation AUC of custom_cnn over the same epochs (docs/performance.md)
# Overrides of params.yaml per model, as `dvc exp run -S` would set them
MODEL_OVERRIDES = {"custom_cnn": {}, "resnet50v2": {"model.name": "resnet50v2", "model.weights": "none"},
                   "mobilenetv2": {"model.name": "mobilenetv2", "model.weights": "none"}}
ROW = "gpu_check row: "  # a child process's result line on stdout (Keras prints its epochs there too)


@dataclass(frozen=True)
class Settings:
    accelerator: str
    precisions: tuple[str, ...]
    backbone: str  # the zoo backbone, from scratch
    backbone_precisions: tuple[str, ...]
    image_size: int
    batch_size: int
    sample_every: int  # keep every n-th image of each split of the sample
    epochs: int
    speed_rounds: int  # alternate fits from the TFRecords and from memory (input_vs_compute)
    speed_steps: int
    speed_epochs: int  # per fit; the first is warm-up
    input_batches: int  # batches read alone for the input pipeline's own rate
    model_seconds: int  # time limit of one model's process
    budget_seconds: int  # of the whole check: a model's process gets what is left of it, at most model_seconds


MODES = {
    # 128 px and 32 images a batch: params.yaml's
    "gpu": Settings("gpu", ("float32", "mixed_float16"), "resnet50v2", ("float32", "mixed_float16"), image_size=128,
                    batch_size=32, sample_every=1, epochs=10, speed_rounds=3, speed_steps=100, speed_epochs=3,
                    input_batches=300, model_seconds=240, budget_seconds=450),
    # mobilenetv2 for resnet50v2 (the same path, a fifteenth of the arithmetic), float32 only
    # 40 px: the smallest custom_cnn takes after model.crop; one epoch, two timed steps: the smallest that run it all
    "cpu": Settings("cpu", ("float32", "mixed_bfloat16"), "mobilenetv2", ("float32",), image_size=40, batch_size=8,
                    sample_every=16, epochs=1, speed_rounds=1, speed_steps=2, speed_epochs=2, input_batches=2,
                    model_seconds=600, budget_seconds=1200),  # generous: CI machines may be loaded
}


def pipeline_params(model: str, settings: Settings, accelerator: str, precision: str, deterministic: bool):
    """params.yaml with the run's overrides, validated as the stages validate it."""
    import yaml

    from pneumonia.config import parse_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    overrides = {**MODEL_OVERRIDES[model], "data.image_size": settings.image_size,
                 "train.batch_size": settings.batch_size, "train.epochs": settings.epochs,
                 "train.accelerator": accelerator, "train.precision": precision, "train.deterministic": deterministic}
    for key, value in overrides.items():
        *sections, name = key.split(".")
        section = raw
        for part in sections:
            section = section[part]
        section[name] = value
    return parse_params(raw)


# --- in a model's own process -----------------------------------------------------------------

def input_pipeline_rate(batches, batch_size: int, count: int) -> float:
    """Images/s of the training batches read alone, no model: what the input pipeline reaches on this host."""
    iterator = iter(batches)
    next(iterator)  # warm-up: the files open, the shuffle buffer fills
    return count * batch_size / timed(lambda: [next(iterator) for _ in range(count)])


def speed(model, params, placement, tfrecords: Path, class_weight: dict, settings: Settings) -> dict:
    """The trained model, compiled as the train stage left it, fitted on from the TFRecords and from memory."""
    from pneumonia.data import dataset
    from pneumonia.training import fit

    batch = params.train.batch_size * placement.replicas
    batches = fit.labelled_for(params.model.output, dataset.training_batches(tfrecords, batch, params.train.seed))
    with placement.strategy.scope():
        rounds = tfrecords_and_in_memory_rates(model, batches, batch, class_weight, settings.speed_rounds,
                                               settings.speed_steps, settings.speed_epochs)
    training, in_memory = median([r["tfrecords"] for r in rounds]), median([r["in_memory"] for r in rounds])
    step_ms, compute_ms = 1000 * batch / training, 1000 * batch / in_memory
    return {
        "jit_compile": bool(model.jit_compile),
        "images_per_second": {"training": round(training, 1), "in_memory": round(in_memory, 1),
                              "input_pipeline_alone": round(input_pipeline_rate(batches, batch,
                                                                                settings.input_batches), 1)},
        "step_ms": {"training": round(step_ms, 2), "compute": round(compute_ms, 2),
                    "waiting_for_input": round(max(0.0, step_ms - compute_ms), 2)},
    }


def measure(spec: dict) -> None:
    """One model in each of spec's precisions: the train stage's training, then its speed; prints a row each."""
    import gc

    import keras
    import tensorflow as tf

    from pneumonia import distribute
    from pneumonia.training import fit

    settings, tfrecords = MODES[spec["mode"]], Path(spec["tfrecords"])
    class_weight = {int(label): weight for label, weight in spec["class_weight"].items()}
    for precision in spec["precisions"]:
        params = pipeline_params(spec["model"], settings, spec["accelerator"], precision, spec["deterministic"])
        placement = distribute.place(params.train.accelerator, params.train.precision, params.model.backbone)
        for gpu in tf.config.list_logical_devices("GPU"):
            tf.config.experimental.reset_memory_stats(gpu.name)
        keeper = keras.callbacks.Callback()  # fit hands it the model: timed below without another build and trace
        with tempfile.TemporaryDirectory(prefix="pneumonia-gpu-check-") as scratch:
            trained = fit.train(params.model, params.train, tfrecords, class_weight, Path(scratch) / "model.keras",
                                placement, extra_callbacks=[keeper])
        row = {"model": spec["model"], "accelerator": spec["accelerator"], "reference": spec["reference"],
               "device": placement.device, "precision": placement.precision, "deterministic": spec["deterministic"],
               "epochs": len(trained.history["val_auc"]),
               "val_auc": [round(value, 4) for value in trained.history["val_auc"]],
               "val_loss": [round(value, 4) for value in trained.history["val_loss"]],
               "train_seconds": round(trained.seconds, 1)}
        if not spec["reference"]:
            row.update(speed(keeper.model, params, placement, tfrecords, class_weight, settings))
        row.update(fit.peak_memory_mb())  # peak_memory_mb (the process), gpu_peak_memory_mb since the reset
        print(ROW + json.dumps(row), flush=True)
        del keeper
        keras.backend.clear_session()
        gc.collect()


# --- the parent -------------------------------------------------------------------------------

def devices(settings: Settings) -> dict:
    import tensorflow as tf

    from pneumonia import distribute

    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append({"name": details.get("device_name", gpu.name),
                     "compute_capability": ".".join(map(str, details.get("compute_capability", ())))})
    # This process only prepares data: eager ops on a GPU would take its memory from the models' processes
    tf.config.set_visible_devices([], "GPU")
    build = tf.sysconfig.get_build_info()
    auto = {model: distribute.select_precision("auto", settings.accelerator,
                                               pipeline_params(model, settings, "auto", "auto", True).model.backbone)
            for model in ("custom_cnn", settings.backbone)}
    return {"gpus": gpus, "tensorflow": tf.__version__, "cuda": build.get("cuda_version"),
            "cudnn": build.get("cudnn_version"), "auto_precision": auto}


def sample_tfrecords(workdir: Path, settings: Settings) -> tuple[Path, dict[int, float]]:
    """The compact sample prepared and written as TFRecords once, and the training split's class weights."""
    from pneumonia import paths
    from pneumonia.config import load_params
    from pneumonia.data.class_weights import class_weights
    from pneumonia.data.manifest import read_manifest
    from pneumonia.data.tfrecords import write_tfrecords

    params = load_params(REPO / "params.yaml")
    sample = prepared_sample(workdir, REPO / paths.SAMPLE, settings.sample_every)
    tfrecords = workdir / "tfrecords"
    with working_directory(sample):
        write_tfrecords(paths.MANIFESTS, tfrecords, settings.image_size, params.tfrecords)
    return tfrecords, class_weights(read_manifest(sample / paths.MANIFESTS / "train.csv"), params.train.class_balance)


def run_model(spec: dict, deadline: float) -> list[dict]:
    """One model's process: its rows; a precision it did not finish gets a row with the error."""
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--one", json.dumps(spec)]
    print(f"== {spec['model']} on {spec['accelerator']}: {', '.join(spec['precisions'])}", flush=True)
    seconds = round(min(MODES[spec["mode"]].model_seconds, deadline - time.monotonic()))
    try:
        if seconds < 10:
            raise subprocess.TimeoutExpired(command, seconds, output="")
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=seconds)
        stdout, error, failed = completed.stdout, completed.stderr[-3000:], completed.returncode != 0
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout or ""
        stdout = output.decode() if isinstance(output, bytes) else output
        error, failed = f"stopped after {seconds} s: its time limit within the check's budget", True
    rows = [json.loads(line[len(ROW):]) for line in stdout.splitlines() if line.startswith(ROW)]
    missing = [precision for precision in spec["precisions"] if precision not in {row["precision"] for row in rows}]
    if failed and missing and spec["deterministic"] and "determinis" in error.lower():
        # An op without a deterministic GPU kernel: the rest once more without determinism, the op named
        retried = run_model({**spec, "precisions": missing, "deterministic": False}, deadline)
        return rows + [{**row, "determinism_error": error[-1000:]} for row in retried]
    return rows + [{"model": spec["model"], "accelerator": spec["accelerator"], "reference": spec["reference"],
                    "precision": precision, "error": error} for precision in missing]


def auc_check(runs: list[dict]) -> dict | None:
    """custom_cnn's best validation AUC over the same epochs: each accelerator run against the CPU reference."""
    # The reference is custom_cnn's float32 training on the CPU: a process of its own on a GPU machine, the first
    # run itself with --cpu (see run)
    def is_reference(run: dict) -> bool:
        return run["accelerator"] == "cpu" and run["precision"] == "float32"

    custom_cnn = [run for run in runs if run["model"] == "custom_cnn" and "error" not in run]
    reference = next((run for run in custom_cnn if is_reference(run)), None)
    compared = [run for run in custom_cnn if not is_reference(run)]
    if reference is None or not compared:
        return None
    rows = []
    for run in compared:
        difference = max(run["val_auc"]) - max(reference["val_auc"])
        rows.append({"precision": run["precision"], "device": run["device"], "deterministic": run["deterministic"],
                     "val_auc": max(run["val_auc"]), "reference_val_auc": max(reference["val_auc"]),
                     "difference": round(difference, 4), "within_tolerance": abs(difference) <= AUC_TOLERANCE})
    return {"tolerance": AUC_TOLERANCE, "epochs": reference["epochs"], "runs": rows,
            "all_within": all(row["within_tolerance"] for row in rows)}


def markdown(report: dict) -> str:
    found = report["devices"]
    gpus = ", ".join(f"{gpu['name']} (compute capability {gpu['compute_capability']})" for gpu in found["gpus"])
    auto = ", ".join(f"{precision} for {model}" for model, precision in found["auto_precision"].items())
    lines = ["# GPU check", "",
             f"Mode `{report['mode']}`, finished {report['finished']}: {gpus or 'no GPU seen by TensorFlow'}; "
             f"{report['machine']['cpu']}, {report['machine']['cores']} cores; TensorFlow {found['tensorflow']} "
             f"(CUDA {found['cuda'] or '-'}, cuDNN {found['cudnn'] or '-'}). Reproduce from the repository root: "
             f"`{report['command']}`", "",
             f"`train.precision: auto` on {report['settings']['accelerator']}: {auto}.", "",
             "| model | device | precision | deterministic | training images/s | in memory (compute) | input pipeline "
             "alone | step ms: total / compute / waiting for input | peak GPU memory MB | training seconds "
             "| val AUC per epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        head = f"| {run['model']} | {run.get('device', run['accelerator'])} | {run['precision']} |"
        if "error" in run:
            lines.append(f"{head} failed: see gpu_check.json | | | | | | | |")
            continue
        rates, steps = run.get("images_per_second"), run.get("step_ms")
        speed = (f"{rates['training']} | {rates['in_memory']} | {rates['input_pipeline_alone']} | "
                 f"{steps['training']} / {steps['compute']} / {steps['waiting_for_input']}") if rates else \
            "(CPU reference: not timed) | | |"
        lines.append(f"{head} {run['deterministic']} | {speed} | {run.get('gpu_peak_memory_mb', '-')} "
                     f"| {run['train_seconds']} | {', '.join(map(str, run['val_auc']))} |")
    settings = report["settings"]
    lines += ["", f"The compact sample (every {settings['sample_every']}. image), {settings['image_size']} px, "
              f"{settings['batch_size']} images a batch, {settings['epochs']} epochs; images/s are the median of "
              f"{settings['speed_rounds']} alternating fits of {settings['speed_steps']} steps x "
              f"{settings['speed_epochs'] - 1} timed epochs (benchmarks.input_vs_compute).", ""]
    check = report["auc_check"]
    if check is None:
        lines.append("Validation AUC against the CPU: not compared (a run failed).")
    else:
        lines.append(f"Best validation AUC of custom_cnn over {check['epochs']} epochs against the CPU's (float32, "
                     f"same seed), tolerance {check['tolerance']}:")
        lines += [f"- {row['device']} {row['precision']}: {row['val_auc']} vs {row['reference_val_auc']} "
                  f"({row['difference']:+}): {'within' if row['within_tolerance'] else 'OUTSIDE'}"
                  for row in check["runs"]]
        if not check["all_within"]:
            lines.append("- Outside: GPU and CPU kernels sum and round differently (float16 more), so the "
                         "trainings part after the first steps; a gap this size says that a few epochs on 709 "
                         "images are not settled, or that the GPU path computes something else: look at the "
                         "per-epoch AUC and the losses before trusting GPU results.")
    failed = [run for run in report["runs"] if "determinism_error" in run]
    if failed:
        lines.append(f"- Without determinism (no deterministic GPU kernel): "
                     f"{', '.join(sorted({run['model'] for run in failed}))}; the op is in gpu_check.json.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    from pneumonia.atomic import write_json, write_text

    report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["auc_check"] = auc_check(report["runs"])
    write_json(out / "gpu_check.json", report)
    write_text(out / "gpu_check.md", markdown(report))


def run(out: Path, mode: str) -> dict:
    from benchmarks.run_all import machine

    settings = MODES[mode]
    report = {"mode": mode, "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:]),
              "machine": machine(), "settings": asdict(settings), "devices": devices(settings), "runs": []}
    if mode == "gpu" and not report["devices"]["gpus"]:
        write_report(out, report)
        raise SystemExit("TensorFlow sees no GPU: install the project's gpu extra (tensorflow[and-cuda], "
                         "benchmarks/gpu_check.sh does) and check `nvidia-smi`; or run with --cpu.")
    with tempfile.TemporaryDirectory(prefix="pneumonia-gpu-check-") as workdir:
        tfrecords, class_weight = sample_tfrecords(Path(workdir), settings)
        common = {"mode": mode, "tfrecords": str(tfrecords), "class_weight": class_weight, "deterministic": True}
        deadline = time.monotonic() + settings.budget_seconds
        # custom_cnn first, then its CPU reference: the AUC check does not wait on the backbone. On the CPU the
        # reference would be the first run's float32 training once more: that run is the reference (auc_check)
        for model, accelerator, precisions, reference in (
                ("custom_cnn", settings.accelerator, settings.precisions, False),
                *([("custom_cnn", "cpu", ("float32",), True)] if settings.accelerator != "cpu" else []),
                (settings.backbone, settings.accelerator, settings.backbone_precisions, False)):
            spec = {**common, "model": model, "accelerator": accelerator, "precisions": list(precisions),
                    "reference": reference}
            report["runs"] += run_model(spec, deadline)
            write_report(out, report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU: checks that the script works")
    parser.add_argument("--jax", action="store_true",
                        help="the model under Keras's JAX backend, no TensorFlow (benchmarks/gpu_check_jax.py)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a model's own process
    args = parser.parse_args()
    if args.jax:
        if args.out is None:
            parser.error("--out is required")
        os.makedirs(args.out, exist_ok=True)
        from benchmarks import gpu_check_jax

        gpu_check_jax.main(args)
        return
    quiet_tensorflow()
    if args.one:
        measure(json.loads(args.one))
        return
    if args.out is None:
        parser.error("--out is required")
    os.makedirs(args.out, exist_ok=True)
    report = run(args.out.resolve(), "cpu" if args.cpu else "gpu")
    failed = [f"{run['model']} {run['precision']}" for run in report["runs"] if "error" in run]
    print(f"wrote {args.out / 'gpu_check.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    # --cpu: the AUC check at tiny sizes is reported, not judged (an epoch of a few batches)
    if failed or (not args.cpu and not (report["auc_check"] or {}).get("all_within")):
        sys.exit(1)


if __name__ == "__main__":
    main()
