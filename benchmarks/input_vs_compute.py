"""Target 1: training images/s reading the TFRecords >= 0.95 x images/s training the same model on
the same batches already in memory (the compute limit); default model and image size.

Both are fitted alternately, `train_rounds` rounds; the first epoch of every fit (tracing, the shuffle
buffer filling) is warm-up and not counted. The ratio is the median of the rounds' ratios, so that
a burst of load from elsewhere during one round does not decide it.
"""

from pathlib import Path

from benchmarks.common import (
    REPO,
    Scale,
    epoch_timer,
    load_during,
    main,
    median,
    prepared_sample,
    working_directory,
)

TARGET = 0.95


def tfrecords_and_in_memory_rates(model, from_records, batch_size: int, class_weight: dict | None, rounds: int,
                                  steps: int, epochs: int) -> list[dict[str, float]]:
    """Training images/s of the compiled `model` on `from_records` (the input pipeline's batches) and on
    its first `steps` batches cached in memory, fitted alternately `rounds` times; per fit the median
    of the epochs after the first (warm-up)."""
    in_memory = from_records.take(steps).cache().repeat()
    for _ in in_memory.take(steps):  # fill the cache: these batches now live in memory
        pass

    def images_per_second(batches) -> float:
        timer = epoch_timer()
        model.fit(batches, epochs=epochs, steps_per_epoch=steps, class_weight=class_weight, callbacks=[timer],
                  shuffle=False, verbose=0)
        return median([steps * batch_size / seconds for seconds in timer.seconds[1:]])

    return [{"tfrecords": images_per_second(from_records), "in_memory": images_per_second(in_memory)}
            for _ in range(rounds)]


def run(workdir: Path, scale: Scale, sample_zip: Path) -> dict:
    import keras
    import tensorflow as tf

    from pneumonia import paths
    from pneumonia.config import load_params
    from pneumonia.data import dataset
    from pneumonia.data.class_weights import class_weights
    from pneumonia.data.manifest import read_manifest
    from pneumonia.data.tfrecords import write_tfrecords
    from pneumonia.models.build import build_model
    from pneumonia.training import fit, recipe

    params = load_params(REPO / "params.yaml")
    size, batch_size = params.data.image_size, params.train.batch_size
    sample = prepared_sample(workdir, sample_zip, scale.sample_every)
    tfrecords = workdir / f"sample-tfrecords-{size}"
    if not tfrecords.exists():
        with working_directory(sample):
            write_tfrecords(paths.MANIFESTS, tfrecords, size, params.tfrecords)
    weights = class_weights(read_manifest(sample / paths.MANIFESTS / "train.csv"), params.train.class_balance)

    keras.utils.set_random_seed(params.train.seed)
    model = build_model(params.model, size, params.train.augment)
    recipe.prepare_stage(model, params.model, params.train, recipe.stages(params.train)[0], scale.train_steps)
    batches = dataset.training_batches(tfrecords, batch_size, params.train.seed)
    from_records = fit.labelled_for(params.model.output, batches)

    result: dict = {"model": params.model.name, "image_size": size, "batch_size": batch_size,
                    "devices": [device.device_type for device in tf.config.list_logical_devices()]}
    with load_during(result):
        rounds = tfrecords_and_in_memory_rates(model, from_records, batch_size, weights, scale.train_rounds,
                                               scale.train_steps, scale.train_epochs)
    tfrecords_rate, memory_rate = median([r["tfrecords"] for r in rounds]), median([r["in_memory"] for r in rounds])
    ratio = median([r["tfrecords"] / r["in_memory"] for r in rounds])
    return {
        "target": f"training images/s from TFRecords >= {TARGET} x images/s on the same batches in memory",
        "measured": f"{ratio:.3f} x ({tfrecords_rate:.1f} vs {memory_rate:.1f} images/s)",
        "ratio": round(ratio, 3), "met": ratio >= TARGET,
        "tfrecords_images_per_second": round(tfrecords_rate, 1), "in_memory_images_per_second": round(memory_rate, 1),
        "rounds": [{key: round(value, 1) for key, value in r.items()} for r in rounds],
        **result,
    }


if __name__ == "__main__":
    main(run)
