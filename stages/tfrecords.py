"""DVC stage `tfrecords`: every split resized once and written as sharded TFRecords -> data/tfrecords."""

from pneumonia import paths
from pneumonia.config import load_params
from pneumonia.data.tfrecords import write_tfrecords
from pneumonia.logs import run_stage


def main() -> None:
    params = load_params()
    write_tfrecords(paths.MANIFESTS, paths.TFRECORDS, params.data.image_size, params.tfrecords)


if __name__ == "__main__":
    run_stage(main)
