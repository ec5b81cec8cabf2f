"""The GPU check's JAX mode: the project's model and training recipe on a GPU under Keras's JAX backend,
for a machine with JAX and CUDA but no TensorFlow (at most 8 minutes).

    python -m benchmarks.gpu_check --jax --out OUT          # where Keras, JAX with CUDA and the project's
                                                            # small dependencies are importable
    python -m benchmarks.gpu_check --jax --cpu --out OUT    # tiny sizes on the CPU: checks that it works
    bash benchmarks/gpu_check_wheels.sh DIR                  # the wheels a machine without a package index lacks

What it validates: the model on a GPU under JAX (XLA's kernels), not TensorFlow's GPU path (cuDNN through
TensorFlow, tf.data, the TFRecords) that `python -m benchmarks.gpu_check` checks. The same code as the
pipeline's, but no TensorFlow: `pneumonia.models.build.build_model` (custom_cnn, the default profile of
params.yaml, with its augmentation), `pneumonia.training.recipe` (the Adam optimizer with weight averaging,
the learning-rate schedule, the loss and the metrics), the class weights of `pneumonia.data.class_weights`
and the callbacks of `pneumonia.training.callbacks` (early stopping and the averaged weights' swaps; no
checkpoint file), on the compact sample (data_sample/, every `sample_every`-th image) decoded without
TensorFlow (`pneumonia.data.arrays`: the tfrecords stage's resize and JPEG encode, Pillow's decoder).

Writes OUT/gpu_check_jax.json and OUT/gpu_check_jax.md (rewritten after each process):

* the recipe trained for `epochs` epochs in float32, mixed_bfloat16 and mixed_float16 on the accelerator
  JAX chose (the GPU), and in float32 on the CPU (`JAX_PLATFORMS=cpu`, a process of its own, run beside
  the GPU's): the validation ROC AUC per epoch (Keras' AUC), and each GPU run's best epoch against the
  CPU's, within gpu_check.AUC_TOLERANCE;
* training images/s of the same compiled model in each precision at each of `batch_sizes` (batches that
  fill more and more of the GPU): the median step time of a timed epoch after a warm-up epoch (XLA's
  compile), batches copied from host memory each step as in training, and JAX's peak GPU memory.

Time: each process stops at `model_seconds`, all of them within `budget_seconds`.

`--cpu`: tiny sizes (40 px, batches of 8, a sixteenth of the sample, two epochs, two timed steps), mixed_float16
beside the float32 reference, XLA's CPU compiler at its lowest optimisation level: nothing is measured there, it
shows that the mode works (tests/test_benchmarks.py runs it where importing TensorFlow fails).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import REPO, prepared_sample, working_directory

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
JAX_ROW = "gpu_check_jax row: "  # a child process's result line on stdout (Keras prints its epochs there too)


@dataclass(frozen=True)
class Settings:
    precisions: tuple[str, ...]  # on the accelerator
    image_size: int
    batch_size: int  # the recipe's (train.batch_size)
    sample_every: int  # keep every n-th image of each split of the sample
    epochs: int
    batch_sizes: tuple[int, ...]  # timed
    speed_steps: int  # batches of a timed epoch
    model_seconds: int  # time limit of one process
    budget_seconds: int  # of the whole check


JAX_MODES = {
    # 128 px and 32 images a batch: params.yaml's; 10 epochs as benchmarks.gpu_check
    "gpu": Settings(PRECISIONS, image_size=128, batch_size=32, sample_every=1, epochs=10, batch_sizes=(32, 256, 1024),
                    speed_steps=30, model_seconds=420, budget_seconds=450),
    # mixed_float16 alone beside the float32 reference: the one with another optimizer (loss scaling) and
    # another code path for the averaged weights' swaps; every precision costs XLA's compiles (minutes on 2 cores)
    "cpu": Settings(("mixed_float16",), image_size=40, batch_size=8, sample_every=16, epochs=2, batch_sizes=(8,),
                    speed_steps=2, model_seconds=600, budget_seconds=1200),  # generous: CI machines may be loaded
}


# --- in a child process (KERAS_BACKEND=jax) ----------------------------------------------------

def training_batches(images, labels, batch_size: int, seed: int, steps: int):
    """`steps` full batches an epoch, drawn afresh each epoch (as data.dataset's training batches)."""
    import keras
    import numpy as np

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.random = np.random.default_rng(seed)
            self.on_epoch_end()

        def __len__(self):
            return steps

        def __getitem__(self, index):
            chosen = self.order[index * batch_size:(index + 1) * batch_size]
            return images[chosen], labels[chosen]

        def on_epoch_end(self):
            # with replacement only where a batch is larger than the training split (the timed batches)
            self.order = (self.random.permutation(len(images)) if steps * batch_size <= len(images)
                          else self.random.integers(0, len(images), steps * batch_size))

    return Batches()


def recipe_training(params, data: dict, class_weight: dict) -> dict:
    """The model trained as the train stage trains it (its stages, recipe and callbacks, no checkpoint)."""
    import keras

    from pneumonia.models.build import build_model
    from pneumonia.training import recipe
    from pneumonia.training.callbacks import AtomicModelCheckpoint, make_callbacks

    keras.utils.set_random_seed(params.train.seed)
    model = build_model(params.model, params.data.image_size, params.train.augment)
    steps = len(data["train_images"]) // params.train.batch_size
    batches = training_batches(data["train_images"], data["train_labels"], params.train.batch_size,
                               params.train.seed, steps)
    callbacks = [callback for callback in make_callbacks(params.train, "unused.keras")
                 if not isinstance(callback, AtomicModelCheckpoint)]  # no model file: only its validation
    history: dict[str, list[float]] = {}
    started, done = time.perf_counter(), 0
    for stage in recipe.stages(params.train):
        recipe.prepare_stage(model, params.model, params.train, stage, steps)
        fitted = model.fit(batches, validation_data=(data["val_images"], data["val_labels"]),
                           validation_batch_size=params.train.batch_size, initial_epoch=done,
                           epochs=done + stage.epochs, class_weight=class_weight, callbacks=callbacks, verbose=2)
        for name, values in fitted.history.items():
            history.setdefault(name, []).extend(float(value) for value in values)
        done = len(history["val_auc"])
    return {"epochs": done, "train_seconds": round(time.perf_counter() - started, 1),
                   "jit_compile": bool(model.jit_compile),
                   "val_auc": [round(value, 4) for value in history["val_auc"]],
                   "val_loss": [round(value, 4) for value in history["val_loss"]]}


def images_per_second(params, data: dict, class_weight: dict, batch_size: int, steps: int) -> dict:
    """Training images/s of the recipe's model at `batch_size`: a warm-up epoch (XLA compiles), then one timed.
    A model of its own: under JAX, fitting on a model whose averaged weights the callbacks swapped in a fit
    before failed ("Attempt to donate the same buffer twice")."""
    from benchmarks.common import epoch_timer, median
    from pneumonia.models.build import build_model
    from pneumonia.training import recipe

    model = build_model(params.model, params.data.image_size, params.train.augment)
    stage = recipe.stages(params.train)[-1]
    recipe.prepare_stage(model, params.model, params.train, stage, steps)
    batches = training_batches(data["train_images"], data["train_labels"], batch_size, params.train.seed, steps)
    timer = epoch_timer()
    model.fit(batches, epochs=2, class_weight=class_weight, callbacks=[timer], verbose=0)
    return {"batch_size": batch_size, "images_per_second": round(steps * batch_size / median(timer.seconds[1:]), 1)}


def peak_accelerator_memory_mb() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()  # None on the CPU
    return round(stats["peak_bytes_in_use"] / 2**20, 1) if stats and "peak_bytes_in_use" in stats else None


def measure(spec: dict) -> None:
    """Each of spec's precisions: the recipe's training, then (unless the reference) its speed; a row each."""
    import jax
    import keras
    import numpy as np

    from benchmarks.gpu_check import pipeline_params

    settings = JAX_MODES[spec["mode"]]
    data = dict(np.load(spec["arrays"]))
    class_weight = {int(label): weight for label, weight in spec["class_weight"].items()}
    device = jax.local_devices()[0]
    if spec["mode"] == "gpu" and not spec["reference"] and device.platform != "gpu":
        raise SystemExit(f"JAX sees no GPU (its first device: {device.platform}): install JAX with CUDA, check "
                         "`nvidia-smi`; or run with --cpu")
    for precision in spec["precisions"]:
        keras.config.set_dtype_policy(precision)
        params = pipeline_params("custom_cnn", settings, "auto", "auto", True)
        row = recipe_training(params, data, class_weight)
        row = {"reference": spec["reference"], "platform": device.platform, "device": device.device_kind,
               "precision": precision, **row}
        if not spec["reference"]:
            row["speed"] = [images_per_second(params, data, class_weight, batch_size, settings.speed_steps)
                            for batch_size in settings.batch_sizes]
        row["peak_accelerator_memory_mb"] = peak_accelerator_memory_mb()
        print(JAX_ROW + json.dumps(row), flush=True)
        keras.backend.clear_session()


# --- the parent (imports neither Keras nor JAX) -------------------------------------------------

def sample_arrays(workdir: Path, settings: Settings) -> tuple[Path, dict[int, float]]:
    """The compact sample's training and validation splits as arrays (one .npz the children read), and the
    training split's class weights."""
    import numpy as np

    from pneumonia import paths
    from pneumonia.config import load_params
    from pneumonia.data.arrays import split_arrays
    from pneumonia.data.class_weights import class_weights
    from pneumonia.data.manifest import read_manifest

    params = load_params(REPO / "params.yaml")
    sample = prepared_sample(workdir, REPO / paths.SAMPLE, settings.sample_every)
    arrays = {}
    with working_directory(sample):
        for split in ("train", "val"):
            images, labels = split_arrays(paths.MANIFESTS / f"{split}.csv", settings.image_size,
                                          params.tfrecords.jpeg_quality)
            arrays |= {f"{split}_images": images, f"{split}_labels": labels}
    np.savez(workdir / "sample.npz", **arrays)
    return workdir / "sample.npz", class_weights(read_manifest(sample / paths.MANIFESTS / "train.csv"),
                                                 params.train.class_balance)


def start(spec: dict, cpu_only: bool) -> subprocess.Popen:
    environment = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONUNBUFFERED": "1"}
    if spec["mode"] == "cpu":  # XLA's CPU compiles without LLVM's costly passes: 3x faster (minutes on 2 cores)
        environment.setdefault("XLA_FLAGS",
                               "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    if cpu_only:
        environment["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check_jax", "--one", json.dumps(spec)], cwd=REPO,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, spec: dict, deadline: float) -> list[dict]:
    """The process's rows; a precision it did not finish gets a row with the error."""
    seconds = max(1, round(deadline - time.monotonic()))
    try:
        stdout, stderr = process.communicate(timeout=seconds)
        error = stderr[-3000:] if process.returncode else ""
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, _ = process.communicate()
        error = f"stopped after its time limit within the check's budget ({seconds} s left)"
    rows = [json.loads(line[len(JAX_ROW):]) for line in stdout.splitlines() if line.startswith(JAX_ROW)]
    done = {row["precision"] for row in rows}
    return rows + [{"reference": spec["reference"], "precision": precision, "error": error or "no result"}
                   for precision in spec["precisions"] if precision not in done]


def auc_check(runs: list[dict]) -> dict | None:
    """Each accelerator run's best validation AUC over the same epochs against the CPU reference's."""
    from benchmarks.gpu_check import AUC_TOLERANCE

    reference = next((run for run in runs if run["reference"] and "error" not in run), None)
    compared = [run for run in runs if not run["reference"] and "error" not in run]
    if reference is None or not compared:
        return None
    rows = [{"precision": run["precision"], "platform": run["platform"], "val_auc": max(run["val_auc"]),
             "reference_val_auc": max(reference["val_auc"]),
             "difference": round(max(run["val_auc"]) - max(reference["val_auc"]), 4)} for run in compared]
    for row in rows:
        row["within_tolerance"] = abs(row["difference"]) <= AUC_TOLERANCE
    return {"tolerance": AUC_TOLERANCE, "epochs": reference["epochs"], "runs": rows,
            "all_within": all(row["within_tolerance"] for row in rows)}


def markdown(report: dict) -> str:
    settings, machine = report["settings"], report["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    lines = ["# GPU check, JAX mode", "",
             f"Mode `{report['mode']}`, finished {report['finished']}: {machine['cpu']}, {machine['cores']} cores; "
             f"{versions}. Under Keras's JAX backend: it validates the model on the accelerator under JAX, not "
             f"TensorFlow's GPU path. Reproduce from the repository root: `{report['command']}`", "",
             "| platform | device | precision | jit | training images/s at batch size | peak accelerator memory MB "
             "| training seconds | val AUC per epoch |", "|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"| | | {run['precision']} | failed: see gpu_check_jax.json | | | | |")
            continue
        speed = ", ".join(f"{row['images_per_second']} at {row['batch_size']}" for row in run.get("speed", ())) \
            or "(CPU reference: not timed)"
        lines.append(f"| {run['platform']} | {run['device']} | {run['precision']} | {run['jit_compile']} | {speed} "
                     f"| {run['peak_accelerator_memory_mb'] or '-'} | {run['train_seconds']} "
                     f"| {', '.join(map(str, run['val_auc']))} |")
    lines += ["", f"The compact sample (every {settings['sample_every']}. image), {settings['image_size']} px, "
              f"the recipe's {settings['batch_size']} images a batch for {settings['epochs']} epochs; images/s: "
              f"a timed epoch of {settings['speed_steps']} steps after a warm-up epoch, batches copied from host "
              "memory each step.", ""]
    check = report["auc_check"]
    if check is None:
        lines.append("Validation AUC against the CPU: not compared (a run failed).")
    else:
        lines.append(f"Best validation AUC over {check['epochs']} epochs against the CPU's (float32, same seed, "
                     f"under JAX), tolerance {check['tolerance']}:")
        lines += [f"- {row['platform']} {row['precision']}: {row['val_auc']} vs {row['reference_val_auc']} "
                  f"({row['difference']:+}): {'within' if row['within_tolerance'] else 'OUTSIDE'}"
                  for row in check["runs"]]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    from pneumonia.atomic import write_json, write_text

    report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["auc_check"] = auc_check(report["runs"])
    write_json(out / "gpu_check_jax.json", report)
    write_text(out / "gpu_check_jax.md", markdown(report))


def run(out: Path, mode: str) -> dict:
    from benchmarks.run_all import machine

    settings = JAX_MODES[mode]
    deadline = time.monotonic() + settings.budget_seconds
    report = {"mode": mode, "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:]),
              "machine": machine(("keras", "jax", "jaxlib", "numpy", "pillow")), "settings": asdict(settings),
              "runs": []}
    with tempfile.TemporaryDirectory(prefix="pneumonia-gpu-check-jax-") as workdir:
        arrays, class_weight = sample_arrays(Path(workdir), settings)
        common = {"mode": mode, "arrays": str(arrays), "class_weight": class_weight}
        # The CPU reference beside the accelerator's runs: they need the GPU, it the cores
        reference = {**common, "precisions": ["float32"], "reference": True}
        accelerator = {**common, "precisions": list(settings.precisions), "reference": False}
        processes = [(start(reference, cpu_only=True), reference), (start(accelerator, cpu_only=False), accelerator)]
        for process, spec in reversed(processes):
            report["runs"] += finish(process, spec, min(deadline, time.monotonic() + settings.model_seconds))
            write_report(out, report)
    return report


def main(args) -> None:
    """gpu_check's --jax: the report into args.out; exit 1 when a run failed or a GPU run's AUC is outside."""
    report = run(args.out.resolve(), "cpu" if args.cpu else "gpu")
    failed = [run["precision"] for run in report["runs"] if "error" in run]
    print(f"wrote {args.out / 'gpu_check_jax.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    # --cpu: the AUC check at tiny sizes is reported, not judged (two epochs of a few batches)
    if failed or (not args.cpu and not (report["auc_check"] or {}).get("all_within")):
        sys.exit(1)


if __name__ == "__main__":  # a child process: python -m benchmarks.gpu_check_jax --one SPEC
    assert sys.argv[1] == "--one", "run it as python -m benchmarks.gpu_check --jax"
    measure(json.loads(sys.argv[2]))
