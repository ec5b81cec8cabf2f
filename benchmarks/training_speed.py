"""Target 6: the default profile trains >= 1.5 x the images/s of the previous default, side by side,
and the share of the machine's peak that training reaches.

Variants, each fitted in a process of its own (a precision policy holds for a whole process), one
after the other in `speed_rounds` rounds; every figure is the median of its rounds, the ratio the median
of the per-round ratios. Random images held in memory, so this is the model's compute (the input
pipeline keeps up: target 1). Every variant trains as the train stage does: params.yaml with its
overrides, train.deterministic's settings, the first epoch of each fit (tracing) not counted. `--smoke`
fits the previous and the default profile only, both float32, in the calling process.

  previous default   160 px; zoom, rotation and translation as Keras' three layers (params.yaml before)
  + one transform    160 px; the three as one RandomAffine (pneumonia.models.augmentation)
  default            params.yaml as committed: 128 px, RandomAffine, precision auto
  default + ...      mixed_bfloat16; steps_per_execution 8; train.deterministic false (Grappler on);
                     model.stem strided (float32 and mixed_bfloat16)
  resnet50v2         a pretrained backbone (weights none: the compute of full fine-tuning), float32 and
                     precision auto (mixed_bfloat16 on a CPU with native bfloat16)

Peak: dense matmul (2048 x 2048) and 3x3 convolution (batch 32, 64 x 64 px, 64 -> 64 channels) in
float32 and bfloat16, GFLOP/s, measured in the same run. FLOPs of a training image: the forward pass's,
counted by TensorFlow's profiler on the inference graph, x 3 (the backward pass costs about twice the
forward: the usual estimate); augmentation, batch-norm statistics and the optimizer are not counted.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, Scale, epoch_timer, load_average, main, median

TARGET = 1.5
PREVIOUS = "previous default"
DEFAULT = "default"
VARIANTS = {  # name: params overrides, plus "augmentation": "keras" for the previous three layers
    PREVIOUS: {"data.image_size": 160, "augmentation": "keras"},
    "previous + one transform": {"data.image_size": 160},
    DEFAULT: {},
    "default, mixed_bfloat16": {"train.precision": "mixed_bfloat16"},
    "default, steps_per_execution 8": {"train.steps_per_execution": 8},
    "default, deterministic false": {"train.deterministic": False},
    "default, strided stem": {"model.stem": "strided"},
    "default, strided stem, mixed_bfloat16": {"model.stem": "strided", "train.precision": "mixed_bfloat16"},
    "resnet50v2, float32": {"model.name": "resnet50v2", "model.weights": "none", "train.precision": "float32"},
    "resnet50v2, precision auto": {"model.name": "resnet50v2", "model.weights": "none"},
}
SMOKE_VARIANTS = (PREVIOUS, DEFAULT)


def variant_params(overrides: dict):
    import yaml

    from pneumonia.config import parse_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in overrides.items():
        if key == "augmentation":
            continue
        *parents, last = key.split(".")
        section = raw
        for parent in parents:
            section = section[parent]
        section[last] = value
    return parse_params(raw)


def keras_augmented_model(params):
    """The previous default's model: crop, then Keras' RandomZoom, RandomRotation, RandomTranslation."""
    import keras
    from keras import layers

    from pneumonia.models import custom_cnn
    from pneumonia.models.build import output_layer

    size, augment = params.data.image_size, params.train.augment
    kept = params.model.cropped_size(size)
    inputs = keras.Input((size, size, 3))
    x = layers.CenterCrop(kept, kept)(inputs)
    x = layers.RandomZoom(augment.zoom, fill_mode="constant")(x)
    x = layers.RandomRotation(augment.rotation, fill_mode="constant")(x)
    x = layers.RandomTranslation(augment.translation, augment.translation, fill_mode="constant")(x)
    x = layers.RandomContrast(augment.contrast, value_range=(0, 255))(x)
    x = custom_cnn.features(x, params.model.dropout, params.model.input_norm)
    return keras.Model(inputs, output_layer(params.model.output, x))


def forward_flops(model, size: int) -> int:
    """Floating-point operations of one image through the model (inference graph, batch 1)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    function = tf.function(lambda images: model(images, training=False))
    frozen = convert_variables_to_constants_v2(function.get_concrete_function(tf.TensorSpec([1, size, size, 3])))
    options = tf.compat.v1.profiler.ProfileOptionBuilder(
        tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build()
    return tf.compat.v1.profiler.profile(graph=frozen.graph, options=options).total_float_ops


def fit_rate(name: str, steps: int, epochs: int) -> dict:
    """One variant, in this process: images/s fitting it, and its FLOPs per training image."""
    import keras
    import numpy as np
    import tensorflow as tf

    from pneumonia import distribute
    from pneumonia.models.build import build_model
    from pneumonia.training import fit, recipe

    overrides = VARIANTS[name]
    params = variant_params(overrides)
    fit.seed_everything(params.train)
    keras.mixed_precision.set_global_policy(distribute.select_precision(params.train.precision, "cpu",
                                                                          params.model.backbone))
    size, batch = params.data.image_size, params.train.batch_size
    model = (keras_augmented_model(params) if overrides.get("augmentation") == "keras"
             else build_model(params.model, size, params.train.augment))
    recipe.prepare_stage(model, params.model, params.train, recipe.stages(params.train)[-1], steps)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch * 2, size, size, 3)).astype("float32")
    labels = rng.integers(0, 2, (batch * 2, 1)).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch, drop_remainder=True).repeat()
    timer = epoch_timer()
    model.fit(batches, epochs=epochs, steps_per_epoch=steps, callbacks=[timer], shuffle=False, verbose=0)
    return {"images_per_second": round(median([steps * batch / seconds for seconds in timer.seconds[1:]]), 1),
            "training_flops_per_image": 3 * forward_flops(model, size), "image_size": size,
            "precision": keras.mixed_precision.global_policy().name}


def peak_gflops() -> dict:
    """GFLOP/s of a dense matmul and a 3x3 convolution, float32 and bfloat16, best of 5 after warm-up."""
    import tensorflow as tf

    def best(operation, flops: float) -> float:
        operation()  # warm-up: oneDNN picks and compiles its kernel
        seconds = []
        for _ in range(5):
            started = time.perf_counter()
            operation().numpy()
            seconds.append(time.perf_counter() - started)
        return round(flops / min(seconds) / 1e9, 1)

    result = {}
    for dtype in ("float32", "bfloat16"):
        a = tf.cast(tf.random.uniform((2048, 2048)), dtype)
        x, kernel = tf.cast(tf.random.uniform((32, 64, 64, 64)), dtype), tf.cast(tf.random.uniform((3, 3, 64, 64)),
                                                                                    dtype)
        matmul = tf.function(lambda a=a: tf.matmul(a, a))
        conv = tf.function(lambda x=x, kernel=kernel: tf.nn.conv2d(x, kernel, 1, "SAME"))
        result[dtype] = {"matmul": best(matmul, 2 * 2048**3), "conv3x3": best(conv, 2 * 32 * 64 * 64 * 64 * 64 * 9)}
    return result


def in_process(args: list[str]) -> dict:
    completed = subprocess.run([sys.executable, "-m", "benchmarks.training_speed", *args], cwd=REPO,
                               capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(workdir: Path, scale: Scale, sample_zip: Path) -> dict:
    names = tuple(VARIANTS) if scale.every_speed_variant else SMOKE_VARIANTS
    if scale.speed_processes:
        step_args = ["--steps", str(scale.speed_steps), "--epochs", str(scale.train_epochs)]
        fitted, peak_of = (lambda name: in_process(["--one", name, *step_args])), (lambda: in_process(["--peak"]))
    else:  # smoke: SMOKE_VARIANTS, both float32 on a CPU, so one precision policy does for them: this process
        fitted, peak_of = (lambda name: fit_rate(name, scale.speed_steps, scale.train_epochs)), peak_gflops
    load_before = load_average()
    rounds = [{name: fitted(name) for name in names} for _ in range(scale.speed_rounds)]
    peak = peak_of()
    load_after = load_average()

    variants = {}
    for name in names:
        rates = [each[name]["images_per_second"] for each in rounds]
        flops = rounds[0][name]["training_flops_per_image"]
        precision = rounds[0][name]["precision"]
        reference = peak["bfloat16" if "bfloat16" in precision else "float32"]["conv3x3"]
        variants[name] = {"images_per_second": median(rates), "each_round": rates, "precision": precision,
                          "image_size": rounds[0][name]["image_size"], "training_gflops_per_image": flops / 1e9,
                          "gflops_per_second": round(median(rates) * flops / 1e9, 1),
                          "share_of_conv_peak": round(median(rates) * flops / 1e9 / reference, 3)}
    ratio = median([each[DEFAULT]["images_per_second"] / each[PREVIOUS]["images_per_second"] for each in rounds])
    default, previous = variants[DEFAULT], variants[PREVIOUS]
    return {
        "target": f"default profile >= {TARGET}x the previous default's training images/s",
        "measured": (f"{ratio:.2f}x ({default['images_per_second']} vs {previous['images_per_second']} images/s); "
                     f"training reaches {default['share_of_conv_peak']:.0%} of the float32 convolution peak "
                     f"({peak['float32']['conv3x3']} GFLOP/s)"),
        "met": ratio >= TARGET, "ratio": round(ratio, 2), "variants": variants, "peak_gflops_per_second": peak,
        "rounds": scale.speed_rounds, "load_average": {"before": load_before, "after": load_after},
    }


if __name__ == "__main__":
    if "--one" in sys.argv or "--peak" in sys.argv:
        import argparse

        from benchmarks.common import quiet_tensorflow

        parser = argparse.ArgumentParser()
        parser.add_argument("--one", choices=list(VARIANTS))
        parser.add_argument("--peak", action="store_true")
        parser.add_argument("--steps", type=int, default=20)
        parser.add_argument("--epochs", type=int, default=3)
        args = parser.parse_args()
        quiet_tensorflow()
        print(json.dumps(peak_gflops() if args.peak else fit_rate(args.one, args.steps, args.epochs)))
    else:
        main(run)
