"""Integrity of the prepared data: is every raw file a readable image, and did the split leak.

Every file is read once: hashed (identical content is how leaks are found) and decoded (at a
reduced scale for JPEGs, which still runs through all of the file's data, so a truncated file is
caught), so that later stages never meet a broken image.
"""

import csv
import hashlib
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError
from tqdm import tqdm

from pneumonia import CLASS_NAMES, SPLITS
from pneumonia.atomic import write_csv
from pneumonia.data.images import check_not_blank, open_image, to_grey
from pneumonia.errors import PipelineError

STATS_SIZE = 128  # pixels a side (at least) of the decode the intensity statistics are taken from


@dataclass(frozen=True)
class ImageFacts:
    path: str  # relative to the repository root, '/'-separated
    kaggle_split: str
    label: int
    sha256: str
    width: int  # of the raw file, pixels
    height: int
    mode: str  # PIL mode of the raw file: L (grayscale), RGB, ...
    mean: float  # grayscale intensity 0-255, as the model sees the image
    std: float
    error: str  # why the file is not a readable image; "" when it is


def inspect_file(path: Path, kaggle_split: str, label: int) -> ImageFacts:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        with open_image(data) as image:
            (width, height), mode = image.size, image.mode
            image.draft("L", (STATS_SIZE, STATS_SIZE))  # JPEG: decode at 1/2 to 1/8 scale, much faster
            pixels = np.asarray(to_grey(image), dtype=np.float64)
        check_not_blank(pixels)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "not a readable image"
        # (PIL's own text for an unknown format holds a memory address: not reproducible.)
        unknown = isinstance(exc, UnidentifiedImageError)
        reason = ("UnidentifiedImageError: not an image format PIL can read" if unknown
                  else f"{type(exc).__name__}: {exc}")
        return ImageFacts(path.as_posix(), kaggle_split, label, digest, 0, 0, "", 0.0, 0.0, reason)
    return ImageFacts(path.as_posix(), kaggle_split, label, digest, width, height, mode,
                      round(float(pixels.mean()), 3), round(float(pixels.std()), 3), "")


def inspect_raw(raw: Path) -> list[ImageFacts]:
    """Facts about every file under raw/{split}/{class}/, in a fixed order."""
    files = [(path, split, label)
             for split in SPLITS for label, class_name in enumerate(CLASS_NAMES)
             for path in sorted((raw / split / class_name).glob("*")) if path.is_file()]
    return [inspect_file(*file) for file in tqdm(files, desc="hashing and decoding", unit="img", mininterval=2)]


DOWNLOAD_AGAIN = "The download may be incomplete or the archive damaged: download it again (`dvc repro -f -s download`)"


def check_unreadable(images: list[ImageFacts], max_fraction: float, shown: dict[str, str] | None = None,
                     advice: str = DOWNLOAD_AGAIN) -> list[ImageFacts]:
    """The unreadable files; a PipelineError when they are more than `max_fraction` of all files, listing
    them by `shown` names (the user's: {path: name}; default their paths) with `advice`."""
    unreadable = [image for image in images if image.error]
    if images and len(unreadable) / len(images) > max_fraction:
        listed = "\n".join(f"  {(shown or {}).get(image.path, image.path)}: {image.error}"
                           for image in unreadable[:20])
        more = f"\n  ... and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
        raise PipelineError(
            f"{len(unreadable)} of {len(images)} image files ({len(unreadable) / len(images):.1%}) are not readable "
            f"images, more than data.max_unreadable_fraction = {max_fraction}:\n{listed}{more}\n"
            f"{advice}, or raise data.max_unreadable_fraction to go on without them."
        )
    return unreadable


def audit_splits(splits: dict, official: list[ImageFacts]) -> dict:
    """Leakage findings for the split we made ({name: records}) and for the official archive.

    Leaks (must be 0): identical content in two of train/val/test, a patient in train and val.
    Patients are not compared across the official train/test boundary: Kaggle's `personN` numbers
    restart per split, so the same id there is usually another patient; content is compared instead.
    """
    content = {name: {record.sha256 for record in records} for name, records in splits.items()}
    patients = {name: {record.patient_id for record in records} for name, records in splits.items()}
    leaks = {
        "train_val_patients": len(patients["train"] & patients["val"]),
        "train_val_content": len(content["train"] & content["val"]),
        "train_test_content": len(content["train"] & content["test"]),
        "val_test_content": len(content["val"] & content["test"]),
    }
    official_test = {image.sha256 for image in official if image.kaggle_split == "test"}
    return {
        "passed": not any(leaks.values()),
        "leaks": leaks,
        # Images of Kaggle's train/val whose exact content is also in its test split (dropped from the pool).
        "official_train_images_also_in_test": sum(
            image.kaggle_split != "test" and image.sha256 in official_test for image in official),
        # Extra copies of an image already in the same split: reported, harmless to the split.
        "duplicates_within_split": {name: len(records) - len(content[name]) for name, records in splits.items()},
    }


def raise_if_leaked(audit: dict) -> None:
    if not audit["passed"]:
        leaked = ", ".join(f"{name} = {count}" for name, count in audit["leaks"].items() if count)
        raise PipelineError(
            f"the leakage audit failed: {leaked}. The split shares patients or "
            "image content between train, val and test, so validation or test scores would be inflated. "
            "This is a bug in the prepare stage: please report it with the audit findings (data/audit.json)."
        )


def write_image_table(path: Path, images: list[ImageFacts]) -> None:
    write_csv(path, [field.name for field in fields(ImageFacts)], [astuple(image) for image in images])


def read_image_table(path: Path) -> list[ImageFacts]:
    with open(path, newline="") as file:
        return [ImageFacts(row["path"], row["kaggle_split"], int(row["label"]), row["sha256"], int(row["width"]),
                           int(row["height"]), row["mode"], float(row["mean"]), float(row["std"]), row["error"])
                for row in csv.DictReader(file)]
