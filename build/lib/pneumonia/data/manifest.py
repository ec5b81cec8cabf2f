"""The manifest format: one CSV row per image of a split, written by prepare, read by the later stages."""

import csv
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from pneumonia.atomic import atomic_path, write_csv


@dataclass(frozen=True)
class Record:
    path: str  # relative to the repository root, '/'-separated
    label: int  # 0 NORMAL, 1 PNEUMONIA
    patient_id: str
    sha256: str
    kaggle_split: str


MANIFEST_COLUMNS = tuple(field.name for field in fields(Record))


def write_manifest(path: Path, records: list[Record]) -> None:
    write_csv(path, MANIFEST_COLUMNS, [astuple(record) for record in sorted(records, key=lambda r: r.path)])


def write_manifests(folder: Path, splits: dict[str, list[Record]]) -> None:
    """`folder`/<split>.csv for each split, the folder replaced whole."""
    with atomic_path(folder, directory=True) as out:
        for name, records in splits.items():
            write_manifest(out / f"{name}.csv", records)


def read_manifest(path: Path) -> list[Record]:
    with open(path, newline="") as file:
        return [Record(row["path"], int(row["label"]), row["patient_id"], row["sha256"], row["kaggle_split"])
                for row in csv.DictReader(file)]
