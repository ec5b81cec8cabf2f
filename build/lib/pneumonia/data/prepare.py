"""The prepare stage: manifests for train, val and test.

Kaggle's val split has 16 images, too few to choose a model on, so validation is drawn again from
train + val, by patient and stratified by class. The test split stays exactly as shipped, and
train/val images whose content also appears in test are dropped so that nothing seen in training
is scored as unseen. Unreadable files are left out (up to data.max_unreadable_fraction), and the
split is audited for leaks: the stage writes the findings, then writes the manifests only when the audit
passed (`audit.raise_if_leaked`).
"""

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumonia import CLASS_NAMES
from pneumonia.data.audit import ImageFacts, audit_splits, check_unreadable, inspect_raw
from pneumonia.data.manifest import Record
from pneumonia.errors import PipelineError

log = logging.getLogger(__name__)

# Kaggle names: pneumonia `person1_bacteria_1.jpeg`, `person12_virus_5.jpeg`; normal
# `IM-0115-0001.jpeg`, `NORMAL2-IM-1427-0001.jpeg`. Anything else counts as its own patient.
PATIENT_PATTERNS = (re.compile(r"^(person\d+)_"), re.compile(r"^((?:NORMAL2-)?IM-\d+)-"))




def patient_id(file_name: str) -> str:
    for pattern in PATIENT_PATTERNS:
        if match := pattern.match(file_name):
            return match.group(1)
    return Path(file_name).stem


def record(image: ImageFacts) -> Record:
    return Record(image.path, image.label, patient_id(Path(image.path).name), image.sha256, image.kaggle_split)


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
    n_splits = round(1 / val_fraction)
    labels, groups = np.array([record.label for record in pool]), _groups(pool)
    for label, class_name in enumerate(CLASS_NAMES):
        patients = len(set(groups[labels == label]))
        if patients < n_splits:
            raise PipelineError(
                f"data.val_fraction = {val_fraction} draws validation as 1 of {n_splits} folds of patients per "
                f"class, but class {class_name} has only {patients} patient(s) left for train and val: "
                + (f"raise data.val_fraction to at least {1 / patients:.2f}, or " if patients > 2 else "")
                + "use a larger dataset."
            )
    # Imported here: every `pneumonia` command imports this module (through build-sample's defaults), and
    # scikit-learn's import (1.2 s of CPU) is most of the start-up of those that need no Keras (check-params)
    from sklearn.model_selection import StratifiedGroupKFold

    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_index, val_index = next(folds.split(np.zeros(len(pool)), labels, groups))
    return [pool[i] for i in train_index], [pool[i] for i in val_index]


def check_both_classes(splits: dict[str, list[Record]], unreadable: int) -> None:
    """Training, model choice and evaluation all need images of both classes in each split."""
    for name, records in splits.items():
        missing = [class_name for label, class_name in enumerate(CLASS_NAMES)
                   if not any(r.label == label for r in records)]
        if missing:
            skipped = f" after skipping {unreadable} unreadable image(s)" if unreadable else ""
            raise PipelineError(
                f"{name} has no {' and no '.join(missing)} image{skipped}: every split needs both "
                f"classes. Use a larger dataset{', or repair the unreadable images' if unreadable else ''}."
            )


@dataclass(frozen=True)
class Prepared:
    splits: dict[str, list[Record]]  # the manifests: train, val, test
    summary: dict  # counts for data/split_counts.json
    audit: dict  # leakage findings; the splits are not to be used unless audit["passed"]
    images: list[ImageFacts]  # every raw file, readable or not


def prepare(raw: Path, val_fraction: float, seed: int, *, max_unreadable_fraction: float = 0.01) -> Prepared:
    """The train/val/test split of the images under `raw`, with its counts and leakage audit; a
    PipelineError when too many images are unreadable or a split lacks a class."""
    images = inspect_raw(raw)
    unreadable = check_unreadable(images, max_unreadable_fraction)
    if unreadable:
        log.warning("skipping %d unreadable image file(s): %s", len(unreadable),
                    ", ".join(image.path for image in unreadable[:20]) + (" ..." if len(unreadable) > 20 else ""))
    readable = [image for image in images if not image.error]
    test = [record(image) for image in readable if image.kaggle_split == "test"]
    test_hashes = {r.sha256 for r in test}
    pool = [record(image) for image in readable if image.kaggle_split != "test"]
    kept = [r for r in pool if r.sha256 not in test_hashes]
    check_both_classes({"train + val (before the split)": kept, "the test split": test}, len(unreadable))
    train, val = split_train_val(kept, val_fraction, seed)
    splits = {"train": train, "val": val, "test": test}
    check_both_classes({"the train split": train, "the val split": val}, len(unreadable))

    audit = audit_splits(splits, readable)
    counts = {
        name: {class_name: sum(r.label == label for r in records) for label, class_name in enumerate(CLASS_NAMES)}
        for name, records in splits.items()
    }
    summary = {"images": counts, "dropped_as_in_test": len(pool) - len(kept), "unreadable_skipped": len(unreadable),
               "patients": {name: len({r.patient_id for r in records}) for name, records in splits.items()}}
    return Prepared(splits, summary, audit, images)
