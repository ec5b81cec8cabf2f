"""Outputs appear complete or not at all: write to a temporary sibling, then rename.

A failed or killed stage leaves at most a hidden `.NAME.tmp-*` sibling, which the next attempt
removes; never a half-written file or folder under the real name that DVC or a user could take
for a finished output.
"""

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pneumonia.errors import PipelineError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_temporaries(target: Path) -> None:
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        _remove(stale)


def refuse_folder(target: Path, what: str = "") -> None:
    """A file output named by a user (`what`: how, e.g. "--csv") must not be an existing folder."""
    if Path(target).is_dir():
        raise PipelineError(f"{what + ' ' if what else ''}{target} is a folder: name a file")


@contextmanager
def atomic_path(target: Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    if not directory:
        refuse_folder(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    if directory:
        temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=target.suffix, dir=target.parent)
        os.close(handle)
        temporary = Path(name)
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual umask-based modes.
    umask = os.umask(0)
    os.umask(umask)
    temporary.chmod((0o777 if directory else 0o666) & ~umask)
    try:
        yield temporary
        if directory and target.exists():
            _remove(target)  # os.replace cannot replace a non-empty folder
        os.replace(temporary, target)
    except BaseException:  # the body failed, or the rename did
        _remove(temporary)
        raise


@contextmanager
def staged_outputs(targets: list[Path], name: str) -> Iterator[Callable[[Path], Path]]:
    """Several outputs (files or folders) all or none: yields `staged`, which gives each target's stand-in
    in one scratch folder beside them (`.{name}.tmp-*`); only once the body succeeded is each stand-in
    renamed over its target, folders whole. A failure leaves every target as it was."""
    targets = [Path(target) for target in targets]
    root = Path(os.path.commonpath([target.absolute().parent for target in targets]))
    _remove_stale_temporaries(root / name)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))

    def staged(target: Path) -> Path:
        if Path(target) not in targets:
            raise ValueError(f"{target} is not one of the staged outputs {[str(t) for t in targets]}")
        stand_in = scratch / Path(target).absolute().relative_to(root)
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        return stand_in

    try:
        yield staged
        if missing := [str(target) for target in targets if not staged(target).exists()]:
            raise ValueError(f"outputs not written: {', '.join(missing)}")  # a fault of the caller: none moved
        for target in targets:
            with atomic_path(target, directory=staged(target).is_dir()) as temporary:
                _remove(temporary)
                os.replace(staged(target), temporary)
    finally:
        _remove(scratch)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path: Path, data: Any, sort_keys: bool = True) -> None:
    """`data` as indented JSON; `sort_keys=False` keeps the order a report was built in."""
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def write_csv(path: Path, header: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    """The project's one CSV writer: quoted as the csv module quotes (a file name may hold a comma or a
    quote), None written empty, lines ended by "\n" on every platform."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())
