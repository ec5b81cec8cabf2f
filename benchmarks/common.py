"""What the benchmarks share: the sample prepared once, full-resolution stand-ins, manifests,
repeated timings and the measurement of a process tree's memory.

The machine may be shared: every figure is the median of several repetitions, measurements to be
compared are taken alternately, and each result carries the load average seen while it ran.
"""

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from harness import REPO
from pneumonia.atomic import write_json, write_text

SAMPLE_ZIP = REPO.parent / "shared" / "datasets" / "chest-xray-sample.zip"
# The scores a benchmark's table shows of each model, in its column order.
SCORE_COLUMNS = ("roc_auc", "accuracy", "sensitivity", "specificity")


@dataclass(frozen=True)
class Scale:
    """How big each benchmark runs: `full` for the report, `smoke` to check that they work."""

    repeats: int = 3
    sample_every: int = 1  # keep every n-th image of each split of the sample
    # input_vs_compute: many short alternating rounds, so that a burst of load hits both sides alike
    train_rounds: int = 6
    train_steps: int = 8  # batches an epoch; the first epoch of each fit is warm-up and not counted
    train_epochs: int = 3
    # training_speed: rounds of every variant in turn, each a fit of speed_steps batches x train_epochs
    speed_rounds: int = 3
    speed_steps: int = 10
    every_speed_variant: bool = True  # False: the previous and the default profile only
    speed_processes: bool = True  # each variant fitted in a process of its own (its precision policy); False: here
    # full-resolution stand-ins (tfrecords_vs_folders, conversion_scaling)
    standins: int = 400
    standin_size: tuple[int, int] = (1800, 1500)  # width, height: the Kaggle images' typical size
    read_batches: int = 300  # batches read from the TFRecords per timing
    folder_passes: int = 2  # passes over the stand-in folder per timing
    conversion_copies: tuple[int, int] = (1, 6)  # manifests repeating the stand-ins: the difference is steady state
    # inference: pneumonia predict on this many stand-ins; one-image requests to the served model, this many
    # at each number of concurrent clients
    predict_images: int = 1000
    serve_clients: tuple[int, ...] = (1, 4, 8)
    serve_requests: int = 200
    # `pneumonia predict` on one image, a fresh process each: with the bundle's model.onnx, and without (Keras)
    startup_engines: tuple[str, ...] = ("onnx", "keras")
    # memory
    memory_copies: tuple[int, int] = (1, 4)
    # incremental_dvc
    # The no-op repro does not depend on the image size; 88 px (xception's 71 px minimum after model.crop) keeps
    # both trainings short.
    dvc_params: tuple[str, ...] = ("data.source=local", "data.image_size=88", "train.epochs=1")
    dvc_experiment: tuple[str, ...] = ("model.name=xception", "model.weights=none")
    dvc_target: str | None = None  # the stage `dvc repro` runs up to; None: every stage


FULL = Scale()
SMOKE = replace(
    FULL, repeats=1, sample_every=25, train_rounds=1, train_steps=2, train_epochs=2, speed_rounds=1, speed_steps=2,
    every_speed_variant=False, speed_processes=False, standins=12, standin_size=(360, 300), read_batches=4,
    folder_passes=1, conversion_copies=(1, 2), predict_images=12, serve_clients=(1, 4), serve_requests=8,
    startup_engines=("onnx",),
    memory_copies=(1, 2),
    # The first three data stages, and no experiment (that `dvc exp run -S` reruns train and evaluate
    # only is checked by tests/test_pipeline_e2e.py). val_fraction 0.25: with 6 patients a class, 0.15 leaves no
    # validation fold (prepare refuses it)
    dvc_params=("data.source=synthetic", "data.synthetic.patients_per_class=6", "data.synthetic.image_size=40",
                "data.val_fraction=0.25"),
    dvc_experiment=(), dvc_target="class_weights",
)


def median(values: list[float]) -> float:
    return statistics.median(values)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


@contextmanager
def load_during(result: dict) -> Iterator[None]:
    """Record the 1-minute load average before and after a measurement (2.0 = both cores busy)."""
    before = load_average()
    yield
    result["load_average"] = {"before": before, "after": load_average()}


def measured_on(report: dict) -> str:
    """A report's last line: how to reproduce it, when and where it was measured, and the load (load_during's)."""
    machine, load = report["machine"], report["load_average"]
    return (f"Reproduce: `{report['command']}`. Measured {report['date']} on {machine['cpu']} ({machine['cores']} "
            f"cores), load average {load['before']:.1f} before, {load['after']:.1f} after.")


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def epoch_timer():
    """A Keras callback whose `seconds` lists each epoch's wall time (the first is warm-up: tracing)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    return EpochTimer()


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# --- data -------------------------------------------------------------------------------------

def prepared_sample(workdir: Path, sample_zip: Path, every: int) -> Path:
    """The sample extracted and split as the pipeline's download and prepare stages do it (every
    n-th image of each split kept), once per work folder: returns the folder holding data/raw and
    data/manifests (manifest paths relative to it)."""
    from pneumonia import SPLITS, paths
    from pneumonia.data.download import extract_archive
    from pneumonia.data.manifest import read_manifest, write_manifest, write_manifests
    from pneumonia.data.prepare import prepare

    root = workdir / f"sample-every-{every}"
    if not (root / paths.MANIFESTS / "test.csv").exists():
        root.mkdir(parents=True, exist_ok=True)
        with working_directory(root):
            extract_archive(sample_zip, paths.RAW)
            write_manifests(paths.MANIFESTS, prepare(paths.RAW, val_fraction=0.15, seed=42).splits)
            for split in SPLITS:
                manifest = paths.MANIFESTS / f"{split}.csv"
                write_manifest(manifest, read_manifest(manifest)[::every])
    return root


def sample_records(sample: Path, split: str) -> list:
    """A split's manifest records with absolute paths, so that they can be read from anywhere."""
    from pneumonia import paths
    from pneumonia.data.manifest import read_manifest

    manifest = sample / paths.MANIFESTS / f"{split}.csv"
    return [replace(record, path=str(sample / record.path)) for record in read_manifest(manifest)]


def manifests_for_tfrecords(manifests: Path, splits: dict[str, list]) -> Path:
    """`manifests` as write_tfrecords reads them: the records of `splits`, the splits not given empty."""
    from pneumonia import SPLITS
    from pneumonia.data.manifest import write_manifests

    write_manifests(manifests, {split: splits.get(split, []) for split in SPLITS})
    return manifests


def _standin(source: str, target: Path, size: tuple[int, int], seed: int) -> None:
    import numpy as np
    from PIL import Image

    image = Image.open(source).convert("L").resize(size, Image.Resampling.BICUBIC)
    # Film grain: an upscaled 224 px image alone compresses far better than a real radiograph.
    grain = np.random.default_rng(seed).normal(0, 2.0, (size[1], size[0]))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(target, format="JPEG", quality=80)


def standins(workdir: Path, sample: Path, count: int, size: tuple[int, int]) -> tuple[Path, list]:
    """`count` training images of the sample upscaled to `size` grayscale JPEGs (~0.16 MB at
    1800x1500, like the Kaggle originals) in {NORMAL,PNEUMONIA}/ folders; returns the folder and
    their manifest records. Made once per work folder."""
    from concurrent.futures import ProcessPoolExecutor

    from pneumonia import CLASS_NAMES

    folder = workdir / f"standins-{count}-{size[0]}x{size[1]}"
    train = sample_records(sample, "train")
    chosen = train[:: max(1, len(train) // count)][:count]  # spread over both classes
    records = [replace(record, path=str(folder / CLASS_NAMES[record.label] / Path(record.path).name))
               for record in chosen]
    done = folder.with_name(folder.name + ".done")  # beside, not inside: the folder is read as a dataset
    if not done.exists():
        for class_name in CLASS_NAMES:
            (folder / class_name).mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_standin, [r.path for r in chosen], [Path(r.path) for r in records],
                          [size] * len(records), range(len(records))))
        done.touch()
    return folder, records


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def write_report(folder: Path, name: str, report: dict, table: str) -> None:
    """A benchmark's report: <folder>/<name>.json (the measurements) and <name>.md (their table), atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{name}.json", report, sort_keys=False)
    write_text(folder / f"{name}.md", table)


def replace_block(page: Path, start: str, end: str, text: str) -> None:
    """Put `text` between the marker lines `start` and `end` of `page` (a README table made by a benchmark)."""
    content = page.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"{page} has no {start} ... {end} block to fill")
    head, rest = content.split(start, 1)
    write_text(page, head + start + "\n" + text.strip("\n") + "\n" + rest[rest.index(end):])


# --- processes --------------------------------------------------------------------------------

def peak_tree_rss(args: list[str], cwd: Path, interval: float = 0.02) -> dict:
    """Run `args` as a child process; peak resident memory of it and all its descendants (the
    decoding workers), summed, sampled every `interval` seconds; and of the largest single process."""
    import psutil

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    child = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(child.pid)
    peak_sum = peak_single = processes = 0
    started = time.perf_counter()
    while child.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            sizes = [process.memory_info().rss for process in tree]
        except psutil.Error:  # a process ended between listing and reading
            continue
        peak_sum, peak_single = max(peak_sum, sum(sizes)), max(peak_single, max(sizes))
        processes = max(processes, len(tree))
        time.sleep(interval)
    seconds = time.perf_counter() - started
    _, stderr = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({child.returncode}):\n{stderr[-3000:]}")
    return {"peak_rss_mb": round(peak_sum / 2**20, 1), "peak_single_process_rss_mb": round(peak_single / 2**20, 1),
            "processes": processes, "seconds": round(seconds, 2)}


def python() -> str:
    return sys.executable


# --- running one benchmark --------------------------------------------------------------------

def main(run: Callable[..., dict], options: dict[str, type] | None = None) -> None:
    """Command line of every benchmark script: run it, print or write its result as JSON. `options`: the
    script's own, {name: type}, each `--name VALUE` passed to `run` as a keyword when given."""
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=sys.modules[run.__module__].__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it works, not the target")
    parser.add_argument("--workdir", type=Path, help="reusable scratch folder (default: a temporary one)")
    parser.add_argument("--sample", type=Path, default=SAMPLE_ZIP, help="the chest X-ray sample zip")
    parser.add_argument("--json", type=Path, help="write the result here instead of printing it")
    for name, kind in (options or {}).items():
        parser.add_argument(f"--{name}", type=kind)
    args = parser.parse_args()
    given = {name: value for name in options or {} if (value := getattr(args, name)) is not None}
    quiet_tensorflow()
    with tempfile.TemporaryDirectory(prefix="pneumonia-bench-") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(workdir.resolve(), SMOKE if args.smoke else FULL, args.sample.resolve(), **given)
    write_json(args.json, result, sort_keys=False) if args.json else print(json.dumps(result, indent=2))


def cpus_of_runs(runs: list[tuple[str, str]]) -> str:
    """" Trained on CPU: run, run; ..." from (run's label, its CPU or "") pairs: the same seed trains another model on
    another CPU model (docs/results.md#reproducibility), so a report says where each run trained."""
    by_cpu: dict[str, list[str]] = {}
    for label, cpu in runs:
        by_cpu.setdefault(cpu, []).append(label)
    recorded = [f"{cpu}: {', '.join(labels)}" for cpu, labels in by_cpu.items() if cpu]
    if not recorded:
        return ""
    others = "; the other runs were made before runs recorded their CPU" if "" in by_cpu else ""
    return f" Trained on {'; '.join(recorded)}{others}."
