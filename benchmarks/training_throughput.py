"""Training throughput (images/s) per model, precision and distribution strategy on this machine.

    python -m benchmarks.training_throughput                  # the defaults below, a few minutes on 2 cores
    python -m benchmarks.training_throughput --models custom_cnn densenet121 --precisions float32 mixed_float16 \\
        --strategies default mirrored --image-size 224 --batch-size 32
    python -m benchmarks.training_throughput --smoke          # tiny: checks that it works

Writes `throughput.json` and `throughput.md` to --out (default benchmarks/throughput/). Each
combination runs in a process of its own (a precision policy and the devices are fixed per process):
the model of the registry (`model.weights: none`), compiled as the train stage compiles it, fitted
inside the strategy's scope on random images held in memory, so the figure is the compute limit of
the model, not of the input pipeline (benchmarks/input_vs_compute.py compares the two). `batch-size`
is per replica, as `train.batch_size`. The first epoch (tracing) is warm-up and not counted; the
figure is the median of the other epochs.

Strategies: `default` (one device), `mirrored` (all GPUs; on a machine without GPUs, two logical
CPU devices, which shows the cost of synchronising replicas rather than a gain). A multi-worker or
TPU figure needs that hardware: run this script there with `--strategies auto` (train.accelerator: auto).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO, epoch_timer, load_during, median, quiet_tensorflow

DEFAULT_MODELS = ["custom_cnn", "mobilenetv2", "efficientnetb0"]


def measure(model_name: str, precision: str, strategy_name: str, image_size: int, batch_size: int, steps: int,
            epochs: int) -> dict:
    """One combination, in this process."""
    import keras
    import numpy as np
    import tensorflow as tf

    from pneumonia import distribute
    from pneumonia.config import parse_params
    from pneumonia.models.build import NO_AUGMENTATION, build_model
    from pneumonia.training import recipe

    if strategy_name == "mirrored" and not tf.config.list_physical_devices("GPU"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy, device = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), "cpu (2 logical devices)"
    elif strategy_name == "mirrored":
        strategy, device = tf.distribute.MirroredStrategy(), "gpu"
    elif strategy_name == "auto":
        placement = distribute.place("auto", "auto" if precision == "auto" else precision)
        strategy, device, precision = placement.strategy, placement.device, placement.precision
        strategy_name = f"auto: {placement.strategy_name}"
    else:
        strategy, device = tf.distribute.get_strategy(), "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    keras.mixed_precision.set_global_policy(distribute.select_precision(precision, device.split()[0]))

    # The network alone: no border crop, no augmentation (as these numbers were measured)
    params = parse_params({"data": {"image_size": image_size},
                           "model": {"name": model_name, "weights": "none", "crop": 0},
                           "train": {"batch_size": batch_size, "augment": NO_AUGMENTATION.model_dump()}})
    global_batch = batch_size * strategy.num_replicas_in_sync
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (global_batch * 2, image_size, image_size, 3)).astype("float32")
    labels = rng.integers(0, 2, (global_batch * 2, 1)).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(global_batch, drop_remainder=True).repeat()

    with strategy.scope():
        model = build_model(params.model, image_size, params.train.augment)
        recipe.prepare_stage(model, params.model, params.train, recipe.stages(params.train)[0], steps)
    times = epoch_timer()
    result = {"model": model_name, "precision": keras.mixed_precision.global_policy().name, "strategy": strategy_name,
              "device": device, "replicas": strategy.num_replicas_in_sync, "image_size": image_size,
              "batch_size_per_replica": batch_size, "steps_per_epoch": steps}
    with load_during(result):
        model.fit(batches, epochs=epochs, steps_per_epoch=steps, callbacks=[times], verbose=0)
    rates = [steps * global_batch / seconds for seconds in times.seconds[1:]]
    return {**result, "images_per_second": round(median(rates), 1), "epochs_measured": len(rates)}


def markdown(report: dict) -> str:
    lines = ["# Training throughput", "", f"Measured {report['finished']} on {report['machine']}. "
             f"Reproduce from the repository root: `{report['command']}`", "",
             "| model | precision | strategy | device | replicas | images/s | load average (before/after) |",
             "|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['precision']} | {row['strategy']} "
                         "| failed: see throughput.json | | | |")
            continue
        load = row["load_average"]
        lines.append(f"| {row['model']} | {row['precision']} | {row['strategy']} | {row['device']} "
                     f"| {row['replicas']} | "
                     f"{row['images_per_second']} | {load['before']} / {load['after']} |")
    lines += ["", f"{report['image_size']} px images, {report['batch_size']} per replica, random images in memory "
              "(the model's compute limit, not the input pipeline's); median of the epochs after the first.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"],
                        choices=["auto", "float32", "mixed_float16", "mixed_bfloat16"])
    parser.add_argument("--strategies", nargs="+", default=["default", "mirrored"],
                        choices=["default", "mirrored", "auto"])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16, help="per replica")
    parser.add_argument("--steps", type=int, default=8, help="batches an epoch")
    parser.add_argument("--epochs", type=int, default=4, help="the first is warm-up")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, custom_cnn only: checks that it works")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "throughput")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "PRECISION", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_tensorflow()
    if args.smoke:
        args.models, args.image_size, args.batch_size, args.steps, args.epochs = ["custom_cnn"], 32, 4, 2, 2
    if args.one:
        print(json.dumps(measure(*args.one, args.image_size, args.batch_size, args.steps, args.epochs)))
        return

    import platform
    from datetime import UTC, datetime

    from pneumonia.atomic import write_json, write_text

    sizes = ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
             "--epochs", str(args.epochs)]
    results = []
    for model in args.models:
        for precision in args.precisions:
            for strategy in args.strategies:
                print(f"== {model} {precision} {strategy}", flush=True)
                completed = subprocess.run([sys.executable, "-m", "benchmarks.training_throughput", "--one", model,
                                            precision, strategy, *sizes], cwd=REPO, capture_output=True, text=True)
                if completed.returncode != 0:
                    results.append({"model": model, "precision": precision, "strategy": strategy,
                                    "error": completed.stderr[-3000:]})
                    continue
                results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
                print(f"   {results[-1]['images_per_second']} images/s", flush=True)
    report = {"machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
              "finished": datetime.now(UTC).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.training_throughput " + " ".join(sys.argv[1:]),
              "image_size": args.image_size, "batch_size": args.batch_size, "results": results}
    write_json(args.out / "throughput.json", report)
    write_text(args.out / "throughput.md", markdown(report))
    print(f"wrote {args.out / 'throughput.md'}")


if __name__ == "__main__":
    main()
