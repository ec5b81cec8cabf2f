"""DVC stage `data_report`: counts, raw image statistics, sample images, class weights, leakage audit
-> reports/data/ (logged to MLflow by the evaluate stage, so report changes cost no retraining)."""

import json
import logging
from pathlib import Path

from pneumonia import paths
from pneumonia.atomic import atomic_path, write_json
from pneumonia.config import load_params
from pneumonia.data.audit import read_image_table
from pneumonia.data.manifest import read_manifest
from pneumonia.data.report import data_summary, draw_data_figures
from pneumonia.logs import run_stage


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def main() -> None:
    load_params()  # reads no params, but stops on an invalid params.yaml like every stage
    images, train = read_image_table(paths.IMAGE_TABLE), read_manifest(paths.MANIFESTS / "train.csv")
    report = data_summary(_json(paths.RAW_SOURCE), images, _json(paths.SPLIT_COUNTS), _json(paths.CLASS_WEIGHTS),
                     _json(paths.DATA_AUDIT))
    with atomic_path(paths.DATA_REPORT, directory=True) as out:
        write_json(out / "summary.json", report)
        draw_data_figures(out / "figures", report, images, train)
    logging.getLogger("data_report").info("images as shipped: %s; as used: %s",
                                          report["images"]["as_shipped"], report["images"]["as_used"])


if __name__ == "__main__":
    run_stage(main)
