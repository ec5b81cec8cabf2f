"""The download stage: Kaggle, a local archive or folder, or the synthetic set, normalised to
{train,val,test}/{NORMAL,PNEUMONIA}/ image files plus a source.json that says where they came from.
"""

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pneumonia import CLASS_NAMES, SPLITS, paths
from pneumonia.atomic import atomic_path, write_json
from pneumonia.config import DataConfig
from pneumonia.data import synthetic
from pneumonia.data.archive import check_free_space, extract, open_zip
from pneumonia.data.layout import hashed_name, in_folder, in_zip, locate_splits
from pneumonia.errors import PipelineError

log = logging.getLogger(__name__)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def extract_archive(archive: Path, out: Path) -> None:
    """Extract only the split/class images of a Kaggle-layout zip into `out`/split/class/.

    `out` is a temporary folder (see download), so nothing of a damaged archive is kept.
    """
    with open_zip(archive, str(archive), "Download it again.") as opened:
        by_name = {info.filename: info for info in opened.infolist() if not info.is_dir()}
        extract(opened, [(by_name[name], out / split / class_name / PurePosixPath(name).name)
                         for (split, class_name), names in locate_splits(list(by_name), in_zip(opened)).items()
                         for name in names],
                out, f"the archive {archive}")


def regular_files(folder: Path) -> list[str]:
    """Files under `folder`, '/'-separated relative names, without following symbolic links: a link
    could pull in any file the user can read (or loop), and DVC would not see its target change."""
    names, links = [], []
    for root, dirs, files in os.walk(folder):  # does not descend into linked folders
        for name in sorted(dirs) + sorted(files):
            path = Path(root) / name
            if path.is_symlink():
                links.append(path.relative_to(folder).as_posix())
            elif name in files and path.is_file():
                names.append(path.relative_to(folder).as_posix())
    if links:
        log.warning("not following %d symbolic link(s) in %s: %s", len(links), folder,
                    ", ".join(links[:10]) + (" ..." if len(links) > 10 else ""))
    return names


def copy_folder(folder: Path, out: Path) -> None:
    files = locate_splits(regular_files(folder), in_folder(folder))
    check_free_space(sum((folder / name).stat().st_size for names in files.values() for name in names), out,
                     f"the folder {folder}")
    for (split, class_name), members in tqdm(files.items(), desc="copying", mininterval=2):
        target = out / split / class_name
        target.mkdir(parents=True, exist_ok=True)
        for name in members:
            shutil.copyfile(folder / name, target / PurePosixPath(name).name)


def hash_file_names(raw: Path) -> None:
    """Rename every image of `raw`/split/class/ to layout.hashed_name (data.hash_file_names)."""
    for split in SPLITS:
        for class_name in CLASS_NAMES:
            for path in sorted((raw / split / class_name).glob("*")):
                path.rename(path.with_name(hashed_name(path.name)))


def count_images(raw: Path) -> dict[str, dict[str, int]]:
    return {
        split: {c: sum(1 for p in (raw / split / c).glob("*") if p.is_file()) for c in CLASS_NAMES}
        for split in SPLITS
    }


def _from_kaggle(config: DataConfig, out: Path) -> dict:
    from pneumonia.data import kaggle  # the kaggle package is imported only when Kaggle is the source

    method = kaggle.find_credentials()
    log.info("downloading %s from Kaggle (credentials from %s)", config.kaggle_dataset, method)
    # One scratch folder per dataset, kept when the stage is killed: the next run resumes the partial
    # archive in it (the client appends only to bytes it can prove are of the same remote file).
    scratch = out.parent / f".download-{config.kaggle_dataset.replace('/', '--')}"
    for stale in out.parent.glob(".download-*"):
        if stale != scratch:  # other datasets', or random names of older versions: 1.2 GB each
            log.info("removing the stale download folder %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
    try:
        archive = kaggle.download_archive(config.kaggle_dataset, scratch)
        extract_archive(archive.path, out)
    except PipelineError:
        if any(scratch.glob("*.zip")) and not any(scratch.glob("*.kaggle-partial")):
            shutil.rmtree(scratch, ignore_errors=True)  # a complete but unusable archive: start afresh next time
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    return {"kaggle_dataset": archive.slug, "version": archive.version,
            "archive_sha256": archive.sha256, "archive_size_bytes": archive.size_bytes}


def local_archive(config: DataConfig) -> Path:
    """The existing file or folder named by data.local_path, or a PipelineError saying what to do."""
    path = paths.resolve_user_path(config.local_path)
    if not path.exists():
        raise PipelineError(
            f"params.yaml: data.local_path = {config.local_path!r} does not exist (looked at {path}).\n"
            "Point it to the Kaggle archive (a .zip, or the unpacked folder with train/ and test/), "
            "e.g. `dvc exp run -S data.local_path=/path/to/chest-xray-pneumonia.zip`, "
            "or use data.source: kaggle or synthetic."
        )
    return path


def _from_local(config: DataConfig, out: Path) -> dict:
    path = local_archive(config)
    if path.is_dir():
        copy_folder(path, out)
        return {"local_path": config.local_path}
    log.info("hashing %s", path)
    digest = sha256_file(path)
    extract_archive(path, out)
    return {"local_path": config.local_path, "archive_sha256": digest, "archive_size_bytes": path.stat().st_size}


def same_dataset(a: dict, b: dict) -> bool:
    """Whether two source records name the same data: a Kaggle dataset (any version) or a local path."""
    def name(record: dict) -> str:
        return "/".join(str(record.get("kaggle_dataset", "")).split("/")[:2]) or str(record.get("local_path"))
    return a.get("source") == b.get("source") and name(a) == name(b)


def check_against_record(source: dict, record_path: Path) -> None:
    """Say so when the archive differs from the one recorded by the previous download of the same
    dataset: Kaggle's current version changed, or the local file was replaced."""
    if not record_path.is_file() or "archive_sha256" not in source:
        return
    recorded = json.loads(record_path.read_text())
    if not same_dataset(recorded, source) or recorded.get("archive_sha256") == source["archive_sha256"]:
        return
    pin = ""
    if source["source"] == "kaggle" and recorded.get("version") is not None:
        pin = (f" To train on the recorded one, pin it: `dvc exp run -S data.kaggle_dataset="
               f"{'/'.join(recorded['kaggle_dataset'].split('/')[:2])}/{recorded['version']}`.")
    log.warning("the archive downloaded now differs from the one recorded in %s: version %s, sha256 %s then; "
                "version %s, sha256 %s now. The data changed, so results will too.%s", record_path,
                recorded.get("version"), recorded.get("archive_sha256"), source.get("version"),
                source["archive_sha256"], pin)
    source["differs_from_recorded"] = {key: recorded.get(key) for key in ("version", "archive_sha256")}


def archive_record(source: dict) -> dict:
    """What data_archive.json keeps of a download's source.json: where the archive came from, its
    version and sha256 (not the image counts)."""
    return {key: value for key, value in source.items() if key not in ("images", "synthetic")}


def download(config: DataConfig, raw: Path, record: Path | None = None) -> dict:
    """Fill `raw` atomically from the configured source (compared with the `record` of the previous
    download, when there is one); return what source.json records."""
    try:
        with atomic_path(raw, directory=True) as out:
            if config.source == "kaggle":
                origin = _from_kaggle(config, out)
            elif config.source == "local":
                origin = _from_local(config, out)
            else:
                synthetic.generate(out, config.synthetic, config.seed)
                origin = {"synthetic": config.synthetic.model_dump(), "seed": config.seed}
            if config.hash_file_names:
                hash_file_names(out)
            source = {"source": config.source, **origin, "images": count_images(out)}
            if record is not None:
                check_against_record(source, record)
            write_json(out / "source.json", source)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise PipelineError(
            f"the disk of {raw.parent} is full ({exc.strerror}) while writing {raw}: nothing was kept. "
            "Free up space (the dataset needs about twice its archive's size while it is extracted) "
            "and run the stage again."
        ) from None
    log.info("images per split and class: %s", source["images"])
    return source
