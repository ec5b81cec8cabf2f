"""DVC stage `prepare`: train/val/test manifests (validation re-drawn by patient), checked for unreadable
images and leaks -> data/manifests, data/images.csv, data/split_counts.json, data/audit.json."""

from pneumonia import paths
from pneumonia.atomic import write_json
from pneumonia.config import load_params
from pneumonia.data.audit import raise_if_leaked, write_image_table
from pneumonia.data.manifest import write_manifests
from pneumonia.data.prepare import prepare
from pneumonia.logs import run_stage


def main() -> None:
    data = load_params().data
    prepared = prepare(paths.RAW, data.val_fraction, data.seed, max_unreadable_fraction=data.max_unreadable_fraction)
    write_json(paths.DATA_AUDIT, prepared.audit)  # also when the split leaked: the findings to report
    raise_if_leaked(prepared.audit)
    write_manifests(paths.MANIFESTS, prepared.splits)
    write_image_table(paths.IMAGE_TABLE, prepared.images)
    write_json(paths.SPLIT_COUNTS, prepared.summary)


if __name__ == "__main__":
    run_stage(main)
