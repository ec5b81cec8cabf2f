"""Target 2: read throughput of our training input (TFRecords through dataset.training_batches) >= 10 x
keras.utils.image_dataset_from_directory on the same images at full resolution.

The sample's images are 224 px, so the benchmark makes full-resolution stand-ins: sample images
upscaled to 1800x1500 grayscale JPEGs with film grain, about 0.16 MB each like the Kaggle originals.
Both read at the default image size and batch size, alternately, `repeats` times; the first
batch of each timing (file listing, shuffle buffer) is warm-up and not counted.
"""

from pathlib import Path

from benchmarks.common import (
    REPO,
    Scale,
    load_during,
    main,
    manifests_for_tfrecords,
    median,
    prepared_sample,
    standins,
    timed,
)

TARGET = 10.0


def run(workdir: Path, scale: Scale, sample_zip: Path) -> dict:
    import keras

    from pneumonia.config import load_params
    from pneumonia.data import dataset
    from pneumonia.data.tfrecords import write_tfrecords

    params = load_params(REPO / "params.yaml")
    size, batch_size = params.data.image_size, params.train.batch_size
    folder, records = standins(workdir, prepared_sample(workdir, sample_zip, scale.sample_every), scale.standins,
                               scale.standin_size)
    tfrecords = workdir / f"standin-tfrecords-{len(records)}-{size}"
    if not tfrecords.exists():
        write_tfrecords(manifests_for_tfrecords(workdir / "standin-manifests", {"train": records}), tfrecords, size,
                        params.tfrecords)

    def rate(batches, count: int) -> float:
        iterator = iter(batches)
        next(iterator)  # warm-up
        return count * batch_size / timed(lambda: [next(iterator) for _ in range(count)])

    folder_batches = max(1, -(-len(records) // batch_size) * scale.folder_passes - 1)
    result: dict = {"standins": len(records), "standin_size": list(scale.standin_size),
                    "standin_mean_mb": round(sum(Path(r.path).stat().st_size for r in records) / len(records) / 1e6, 3)}
    rounds = []
    with load_during(result):
        for _ in range(scale.repeats):
            ours = rate(dataset.training_batches(tfrecords, batch_size, params.train.seed), scale.read_batches)
            from_folder = keras.utils.image_dataset_from_directory(
                folder, label_mode="binary", color_mode="rgb", image_size=(size, size), batch_size=batch_size,
                shuffle=True, seed=params.train.seed, verbose=False,
            ).repeat()
            rounds.append({"tfrecords": ours, "image_dataset_from_directory": rate(from_folder, folder_batches)})
    ours, theirs = median([r["tfrecords"] for r in rounds]), median([r["image_dataset_from_directory"] for r in rounds])
    ratio = ours / theirs
    return {
        "target": f"training input images/s >= {TARGET:g} x image_dataset_from_directory on full-resolution JPEGs",
        "measured": f"{ratio:.1f} x ({ours:.0f} vs {theirs:.0f} images/s)",
        "ratio": round(ratio, 2), "met": ratio >= TARGET,
        "tfrecords_images_per_second": round(ours), "image_dataset_from_directory_images_per_second": round(theirs),
        "rounds": [{key: round(value) for key, value in r.items()} for r in rounds],
        **result,
    }


if __name__ == "__main__":
    main(run)
