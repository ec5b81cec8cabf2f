"""The prepare stage: manifests for train, val and test.

Kaggle's val split has 16 images, too few to choose a model on, so validation is drawn again from
train + val, by patient and stratified by class. The test split stays exactly as shipped, and
train/val images whose content also appears in test are dropped so that nothing seen in training
is scored as unseen.
"""

import csv
import hashlib
import io
import re
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pneumonia import CLASS_NAMES
from pneumonia.atomic import atomic_path, write_text

# Kaggle names: pneumonia `person1_bacteria_1.jpeg`, `person12_virus_5.jpeg`; normal
# `IM-0115-0001.jpeg`, `NORMAL2-IM-1427-0001.jpeg`. Anything else counts as its own patient.
PATIENT_PATTERNS = (re.compile(r"^(person\d+)_"), re.compile(r"^((?:NORMAL2-)?IM-\d+)-"))


@dataclass(frozen=True)
class Record:
    path: str  # relative to the repository root, '/'-separated
    label: int  # 0 NORMAL, 1 PNEUMONIA
    patient_id: str
    sha256: str
    kaggle_split: str


MANIFEST_COLUMNS = tuple(field.name for field in fields(Record))


def patient_id(file_name: str) -> str:
    for pattern in PATIENT_PATTERNS:
        if match := pattern.match(file_name):
            return match.group(1)
    return Path(file_name).stem


def scan(raw: Path, split: str) -> list[Record]:
    records = []
    for label, class_name in enumerate(CLASS_NAMES):
        for path in sorted((raw / split / class_name).glob("*")):
            if path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                records.append(Record(path.as_posix(), label, patient_id(path.name), digest, split))
    return records


def _groups(records: list[Record]) -> np.ndarray:
    """Group ids joining images of one patient and images of identical content (union-find)."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    for record in records:
        parent[find("p:" + record.patient_id)] = find("h:" + record.sha256)
    roots = [find("p:" + record.patient_id) for record in records]
    index = {root: i for i, root in enumerate(sorted(set(roots)))}
    return np.array([index[root] for root in roots])


def split_train_val(pool: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    folds = StratifiedGroupKFold(n_splits=round(1 / val_fraction), shuffle=True, random_state=seed)
    labels = np.array([record.label for record in pool])
    train_index, val_index = next(folds.split(np.zeros(len(pool)), labels, _groups(pool)))
    return [pool[i] for i in train_index], [pool[i] for i in val_index]


def prepare(raw: Path, manifests: Path, val_fraction: float, seed: int) -> dict:
    """Write train/val/test manifests under `manifests`; return counts for the data metrics."""
    test = scan(raw, "test")
    test_hashes = {record.sha256 for record in test}
    pool = scan(raw, "train") + scan(raw, "val")
    kept = [record for record in pool if record.sha256 not in test_hashes]
    train, val = split_train_val(kept, val_fraction, seed)
    splits = {"train": train, "val": val, "test": test}
    with atomic_path(manifests, directory=True) as out:
        for name, records in splits.items():
            write_manifest(out / f"{name}.csv", records)
    counts = {
        name: {class_name: sum(r.label == label for r in records) for label, class_name in enumerate(CLASS_NAMES)}
        for name, records in splits.items()
    }
    return {"images": counts, "dropped_as_in_test": len(pool) - len(kept),
            "patients": {name: len({r.patient_id for r in records}) for name, records in splits.items()}}


def write_manifest(path: Path, records: list[Record]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(astuple(record) for record in sorted(records, key=lambda r: r.path))
    write_text(path, buffer.getvalue())


def read_manifest(path: Path) -> list[Record]:
    with open(path, newline="") as file:
        return [Record(row["path"], int(row["label"]), row["patient_id"], row["sha256"], row["kaggle_split"])
                for row in csv.DictReader(file)]
