"""Every zip the project opens (the download stage's archive, evaluate.external, build-sample's source)
is read through here, with the same guards.

A member that would land outside its folder or is a symbolic link is refused; the members' declared
sizes must fit on the disk before a byte is written (zipfile stops at a member's declared size, its
CRC then fails, so they bound what is written: a zip bomb cannot fill the disk); zipfile checks each
member's CRC-32 as it is read; a truncated or corrupt archive is a message, not a traceback.
"""

import shutil
import stat
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pneumonia.errors import PipelineError


def check_member(info: zipfile.ZipInfo) -> None:
    name = PurePosixPath(info.filename)
    if name.is_absolute() or ".." in name.parts:
        raise PipelineError(f"refusing the archive: member {info.filename!r} would be written outside the data folder")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise PipelineError(f"refusing the archive: member {info.filename!r} is a symbolic link")


def check_free_space(needed: int, out: Path, what: str) -> None:
    """Refuse before writing when `needed` bytes (declared by the source) do not fit on out's disk:
    an archive whose members expand past the free space (a zip bomb) must not fill it."""
    existing = next(folder for folder in (out, *out.absolute().parents) if folder.exists())  # `out` may be new
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise PipelineError(
            f"{what} expands to {needed / 1e6:,.0f} MB but only {free / 1e6:,.0f} MB are free on the disk of "
            f"{out.parent}: free up space (or move the project to a larger disk) and run the stage again."
        )


@contextmanager
def open_zip(archive: Path, what: str, hint: str) -> Iterator[zipfile.ZipFile]:
    """The zip `archive` (`what` in messages), every member checked (check_member); an archive found
    damaged while it is open is a PipelineError that ends with `hint`, what to do."""
    try:
        with zipfile.ZipFile(archive) as opened:
            for info in opened.infolist():
                check_member(info)
            yield opened
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise PipelineError(f"{what} is not a readable zip archive ({exc}); it may be truncated or corrupt. {hint}") \
            from None


def extract(opened: zipfile.ZipFile, members: list[tuple[zipfile.ZipInfo, Path]], out: Path, what: str) -> None:
    """Each (member, file) of `members` written, once their declared sizes are known to fit on out's disk."""
    check_free_space(sum(info.file_size for info, _ in members), out, what)
    for info, target in tqdm(members, desc="extracting", unit="file", mininterval=2):
        target.parent.mkdir(parents=True, exist_ok=True)
        with opened.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
