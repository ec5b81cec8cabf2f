"""DVC stage `prepare`: train/val/test manifests (validation re-drawn by patient) -> data/manifests."""

from pneumonia import paths
from pneumonia.atomic import write_json
from pneumonia.config import load_params
from pneumonia.data.prepare import prepare
from pneumonia.logs import run_stage


def main() -> None:
    params = load_params()
    summary = prepare(paths.RAW, paths.MANIFESTS, params.data.val_fraction, params.data.seed)
    write_json(paths.DATA_METRICS, summary)


if __name__ == "__main__":
    run_stage(main)
