"""The data report, and the data version recorded with the MLflow run."""

import json
from pathlib import Path

from PIL import Image

from archives import kaggle_members, write_zip
from pneumonia.config import DataConfig
from pneumonia.data.class_weights import class_weights
from pneumonia.data.download import download
from pneumonia.data.prepare import prepare
from pneumonia.data.report import data_summary, draw_data_figures


def test_report_counts_statistics_weights_and_figures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    members = kaggle_members()
    members["chest_xray/test/PNEUMONIA/person8_virus_1.jpeg"] = b"GIF89a broken"
    source = download(DataConfig(source="local", local_path=str(write_zip(tmp_path / "a.zip", members))),
                      Path("data/raw"))
    prepared = prepare(Path("data/raw"), 0.34, 0, max_unreadable_fraction=0.1)
    train = prepared.splits["train"]
    weights = class_weights(train, "balanced")

    report = data_summary(source, prepared.images, prepared.summary, json.loads(json.dumps(weights)),  # as read back
                     prepared.audit)

    assert report["images"]["as_shipped"] == {"train": {"NORMAL": 6, "PNEUMONIA": 6},
                                              "val": {"NORMAL": 2, "PNEUMONIA": 2},
                                              "test": {"NORMAL": 6, "PNEUMONIA": 7}}
    assert report["images"]["as_used"]["test"] == {"NORMAL": 6, "PNEUMONIA": 6}
    assert report["unreadable"] == [{"path": "data/raw/test/PNEUMONIA/person8_virus_1.jpeg",
                                     "error": "UnidentifiedImageError: not an image format PIL can read"}]
    assert report["raw_images"]["width"] == {"min": 32.0, "median": 32.0, "max": 32.0}
    assert report["raw_images"]["modes"] == {"L": 28}
    assert 60 < report["raw_images"]["intensity"]["mean"] < 160 and report["raw_images"]["intensity"]["std"] > 5
    assert report["class_weights"] == {"NORMAL": weights[0], "PNEUMONIA": weights[1]}
    assert report["leakage_audit"]["passed"] and report["source"]["archive_sha256"] == source["archive_sha256"]

    draw_data_figures(tmp_path / "figures", report, prepared.images, train)
    for name in ("class_distribution", "sample_grid", "image_sizes", "intensity"):
        with Image.open(tmp_path / "figures" / f"{name}.png") as figure:
            assert figure.format == "PNG" and figure.width > 200


def test_run_tags_carry_the_data_version(tmp_path):
    from pneumonia.tracking import data_version_tags

    source = tmp_path / "source.json"
    source.write_text(json.dumps({"source": "kaggle", "kaggle_dataset": "o/n", "version": 2,
                                  "archive_sha256": "ab" * 32, "archive_size_bytes": 10, "images": {}}))
    assert data_version_tags(source) == {"data.kaggle_dataset": "o/n", "data.version": "2",
                                         "data.archive_sha256": "ab" * 32, "data.archive_size_bytes": "10"}
    source.write_text(json.dumps({"source": "kaggle", "kaggle_dataset": "o/n", "version": None,
                                  "archive_sha256": "cd" * 32, "archive_size_bytes": 10}))
    assert (data_version_tags(source)["data.archive_sha256"] == "cd" * 32
            and "data.version" not in data_version_tags(source))
    assert data_version_tags(tmp_path / "missing.json") == {}
