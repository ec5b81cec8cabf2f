"""Find the {train,val,test}/{NORMAL,PNEUMONIA}/ images in whatever layout an archive arrives in.

The real Kaggle archive nests its tree (`chest_xray/train/...`), repeats it
(`chest_xray/chest_xray/...`) and carries macOS litter (`__MACOSX/`, `._*`, `.DS_Store`).
Works on '/'-separated relative names, so zip members and folder files take the same path.
"""

import hashlib
import zipfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from pneumonia import CLASS_NAMES, SPLITS
from pneumonia.data.dicom import is_dicom
from pneumonia.errors import PipelineError

# TIFF: archives and detector exports write it, often 16-bit (images.to_grey scales it)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".dcm", ".dicom")
IMAGE_KINDS = "JPEG, PNG, TIFF or DICOM"  # what IMAGE_SUFFIXES names, for messages

# (split, class name) -> relative names of the image files in that folder
SplitFiles = dict[tuple[str, str], list[str]]


def hashed_name(name: str) -> str:
    """A stable stand-in for a file's name (data.hash_file_names): 16 hex digits of the SHA-256 of its
    base name, and its suffix. A name stays one name across runs; the original is not kept anywhere."""
    base = PurePosixPath(name).name
    return hashlib.sha256(base.encode()).hexdigest()[:16] + PurePosixPath(base).suffix.lower()


def is_macos_litter(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] == ".DS_Store"


def has_image_suffix(name: str) -> bool:
    """Named as a JPEG, PNG, TIFF or DICOM file. A DICOM file may have any name (PACS exports often have no
    suffix): callers that can read a file's first bytes also take those that are DICOM by content."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def in_folder(folder: Path) -> Callable[[str], bool]:
    """is_image for the files of `folder`: by name, or DICOM by content."""
    return lambda name: has_image_suffix(name) or is_dicom(folder / name)


def in_zip(archive: zipfile.ZipFile) -> Callable[[str], bool]:
    """is_image for the members of `archive`: by name, or DICOM by content."""
    def is_image(name: str) -> bool:
        if has_image_suffix(name):
            return True
        with archive.open(name) as member:
            return is_dicom(member)
    return is_image


def _place(name: str, is_image: Callable[[str], bool]) -> tuple[tuple[str, ...], str, str] | None:
    """(root folders, split, class) of an image directly inside a split/class folder, else None."""
    parts = PurePosixPath(name).parts
    if len(parts) < 3:
        return None
    split, class_name = parts[-3].lower(), parts[-2].upper()
    if split not in SPLITS or class_name not in CLASS_NAMES or not is_image(name):  # is_image may read the file
        return None
    return parts[:-3], split, class_name


def locate_splits(names: list[str], is_image: Callable[[str], bool] = has_image_suffix) -> SplitFiles:
    """Group image names by split and class, keeping one copy of a duplicated tree.

    When several roots hold a train/ folder (the nested duplicate), the shallowest wins. `is_image`
    says which names are images (asked only of files inside a split/class folder).
    """
    by_root: dict[tuple[str, ...], SplitFiles] = defaultdict(lambda: defaultdict(list))
    for name in names:
        if is_macos_litter(name):
            continue
        place = _place(name, is_image)
        if place:
            root, split, class_name = place
            by_root[root][(split, class_name)].append(name)

    roots = sorted((root for root, files in by_root.items() if any(s == "train" for s, _ in files)),
                   key=lambda root: (len(root), root))
    if not roots:
        tops = sorted({PurePosixPath(n).parts[0] for n in names if not is_macos_litter(n)})[:10]
        raise PipelineError(
            "the dataset has no train/NORMAL/ or train/PNEUMONIA/ folder of images "
            f"(top-level entries: {', '.join(tops) or 'none'}). Expected the Kaggle layout "
            "chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg; check data.local_path or data.kaggle_dataset."
        )
    files = by_root[roots[0]]
    missing = [f"{split}/{c}" for split in ("train", "test") for c in CLASS_NAMES if not files.get((split, c))]
    if missing:
        raise PipelineError(
            f"the dataset has no images in {', '.join(missing)} (under '{'/'.join(roots[0]) or '.'}'): "
            "both classes are needed in train and test. Is the archive complete?"
        )
    return {key: sorted(value) for key, value in sorted(files.items())}
