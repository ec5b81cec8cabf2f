"""Tiny Kaggle-layout zips built from synthetic images, good or deliberately broken, for the data tests."""

import hashlib
import io
import stat
import zipfile
from pathlib import Path

import numpy as np

from pneumonia.data.synthetic import synthetic_image


def jpeg(seed: int, pneumonia: bool = False, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    synthetic_image(np.random.default_rng(seed), size, pneumonia).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def kaggle_members(root: str = "chest_xray/", patients: int = 3) -> dict[str, bytes]:
    """{name: bytes} of a complete small archive: every split and class, two images per patient."""
    members, seed = {}, 0
    for index, split in enumerate(("train", "val", "test")):
        for patient in range(1, (patients if split != "val" else 1) + 1):
            for image in (1, 2):
                seed += 1
                members[f"{root}{split}/NORMAL/IM-{100 * index + patient:04d}-{image:04d}.jpeg"] = jpeg(seed)
                seed += 1
                members[f"{root}{split}/PNEUMONIA/person{patient}_bacteria_{image}.jpeg"] = jpeg(seed, True)
    return members


def zip_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    """A zip of `members`, plus symbolic-link members {name: target}; names are stored as given."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, bytes], **kwargs) -> Path:
    path.write_bytes(zip_bytes(members, **kwargs))
    return path


def tree_hashes(*roots: Path) -> dict[str, str]:
    """{path: sha256} of every file under the given files/folders."""
    files = [p for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()]
    return {p.as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
