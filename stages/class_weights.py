"""DVC stage `class_weights`: loss weights per class from the training manifest -> data/class_weights.json."""

from pneumonia import paths
from pneumonia.atomic import write_json
from pneumonia.config import load_params
from pneumonia.data.class_weights import class_weights
from pneumonia.data.manifest import read_manifest
from pneumonia.logs import run_stage


def main() -> None:
    params = load_params()
    weights = class_weights(read_manifest(paths.MANIFESTS / "train.csv"), params.train.class_balance)
    write_json(paths.CLASS_WEIGHTS, weights)


if __name__ == "__main__":
    run_stage(main)
