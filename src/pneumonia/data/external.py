"""An external validation set: X-rays of another site, `{NORMAL,PNEUMONIA}/` image folders in a zip
or a folder (evaluate.external), made into model input exactly as the training images are.

It stands for "another hospital": the model is scored on it, never trained, early-stopped or
checkpointed on it. Every file is read, hashed and decoded like the pipeline's own images
(`audit.inspect_file`); an image whose content is also in train, val or test fails the audit, since
the set would no longer be external. The readable images become TFRecords through the same writer
as the splits (`tfrecords.write_records`), so decoding and resizing are one code path.
"""

import logging
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pneumonia import CLASS_NAMES, EXTERNAL_SPLIT as SPLIT
from pneumonia.atomic import atomic_path, write_json
from pneumonia.config import TFRecordsConfig
from pneumonia.data.audit import check_unreadable, inspect_file, read_image_table
from pneumonia.data.layout import IMAGE_SUFFIXES, is_macos_litter
from pneumonia.data.manifest import Record, write_manifest
from pneumonia.data.prepare import patient_id
from pneumonia.data.tfrecords import META, write_records
from pneumonia.errors import PipelineError

log = logging.getLogger(__name__)

LAYOUT_HINT = ("Expected a zip or folder with NORMAL/ and PNEUMONIA/ folders of images (.jpeg, .jpg, .png), "
               "e.g. external/NORMAL/a.jpeg, external/PNEUMONIA/b.jpeg.")


@dataclass(frozen=True)
class ExternalSet:
    records: list[Record]  # readable images, paths into the scratch folder they were read from
    audit: dict  # counts, unreadable files, overlap with train/val/test (must be none)


def class_images(names: list[str]) -> dict[str, list[tuple[str, int]]]:
    """{root: [(name, label), ...]} of the images directly inside a NORMAL/ or PNEUMONIA/ folder."""
    roots: dict[str, list[tuple[str, int]]] = {}
    for name in names:
        parts = PurePosixPath(name).parts
        if is_macos_litter(name) or len(parts) < 2 or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            continue
        class_name = parts[-2].upper()
        if class_name in CLASS_NAMES:
            roots.setdefault("/".join(parts[:-2]), []).append((name, CLASS_NAMES.index(class_name)))
    return roots


def locate_images(names: list[str], source: str) -> list[tuple[str, int]]:
    """The (name, label) pairs of the one root holding NORMAL/ and PNEUMONIA/ image folders."""
    roots = class_images(names)
    if not roots:
        raise PipelineError(f"evaluate.external = {source!r} has no NORMAL/ or PNEUMONIA/ folder of images. "
                            + LAYOUT_HINT)
    if len(roots) > 1:
        listed = ", ".join(f"'{root or '.'}'" for root in sorted(roots))
        raise PipelineError(f"evaluate.external = {source!r} has NORMAL/PNEUMONIA folders under several roots "
                            f"({listed}): which one is the external set is ambiguous. Point evaluate.external "
                            "at a zip or folder with a single such pair.")
    (root, images), = roots.items()
    missing = [name for label, name in enumerate(CLASS_NAMES) if not any(lab == label for _, lab in images)]
    if missing:
        raise PipelineError(f"evaluate.external = {source!r} has no {' or '.join(missing)} images under "
                            f"'{root or '.'}': ROC AUC, sensitivity and specificity need both classes. " + LAYOUT_HINT)
    return sorted(images)


def _copy_images(source: Path, display: str, out: Path) -> list[tuple[Path, int]]:
    """The class images of a zip or folder, copied to `out`/<CLASS>/<name> (symbolic links in a
    folder are not followed: an external set is files, not pointers elsewhere)."""
    copied = []
    if source.is_dir():
        names = [path.relative_to(source).as_posix() for path in source.rglob("*")
                 if path.is_file() and not path.is_symlink()]
        for name, label in locate_images(names, display):
            target = out / CLASS_NAMES[label] / PurePosixPath(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target)
            copied.append((target, label))
        return copied
    try:
        with zipfile.ZipFile(source) as archive:
            infos = {info.filename: info for info in archive.infolist() if not info.is_dir()}
            for name, label in locate_images(list(infos), display):
                target = out / CLASS_NAMES[label] / PurePosixPath(name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(infos[name]) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                copied.append((target, label))
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise PipelineError(f"evaluate.external = {display!r} is not a readable zip archive ({exc}); it may be "
                            "truncated or corrupt. Copy it again, or point evaluate.external at the unpacked "
                            "folder.") from None
    return copied


def read_external(source: Path, display: str, scratch: Path, known_images: Path,
                  max_unreadable_fraction: float) -> ExternalSet:
    """Copy, hash and decode the external images into `scratch`; check them against the pipeline's
    own images (data/images.csv, every raw file with its sha256)."""
    if not source.exists():
        raise PipelineError(f"params.yaml: evaluate.external = {display!r} does not exist (looked at {source}). "
                            "Point it at a zip or folder of NORMAL/ and PNEUMONIA/ images, or set it to '' "
                            "to evaluate without an external set.")
    if not source.is_dir() and not zipfile.is_zipfile(source):
        raise PipelineError(f"evaluate.external = {display!r} is neither a folder nor a zip archive. " + LAYOUT_HINT)
    copied = _copy_images(source, display, scratch)
    facts = [inspect_file(path, SPLIT, label) for path, label in copied]
    unreadable = check_unreadable(facts, max_unreadable_fraction)
    readable = [fact for fact in facts if not fact.error]

    known = {image.sha256: image for image in read_image_table(known_images) if not image.error}
    overlap = [(Path(fact.path).name, known[fact.sha256].path) for fact in readable if fact.sha256 in known]
    duplicates = len(readable) - len({fact.sha256 for fact in readable})
    audit = {
        "passed": not overlap,
        "images": {name: sum(fact.label == label for fact in readable) for label, name in enumerate(CLASS_NAMES)},
        "patients": len({patient_id(Path(fact.path).name) for fact in readable}),
        "unreadable_skipped": [f"{Path(fact.path).name}: {fact.error}" for fact in unreadable],
        "overlap_with_pipeline_images": len(overlap),
        "overlap_examples": [f"{name} = {ours}" for name, ours in overlap[:20]],
        "duplicates_within": duplicates,
    }
    records = [Record(fact.path, fact.label, patient_id(Path(fact.path).name), fact.sha256, SPLIT)
               for fact in readable]
    return ExternalSet(records, audit)


def raise_if_overlapping(audit: dict, display: str) -> None:
    if not audit["passed"]:
        raise PipelineError(
            f"evaluate.external = {display!r}: {audit['overlap_with_pipeline_images']} of its images are also in "
            f"this pipeline's data (e.g. {'; '.join(audit['overlap_examples'][:5])}), so scores on it would not be "
            "external. Remove them from the external set, or use another site's images."
        )


def write_external(source: Path | None, display: str, target: Path, known_images: Path, image_size: int,
                   config: TFRecordsConfig, max_unreadable_fraction: float) -> dict:
    """`target`: the external set's TFRecords (split "external"), manifest and audit; with no source,
    only a meta.json that says so. Returns the audit ({} without a source)."""
    if source is None:
        with atomic_path(target, directory=True) as out:
            write_json(out / META, {"image_size": image_size, "splits": {}, "source": None})
        return {}
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.copy-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.copy-", dir=target.parent) as scratch:
        external = read_external(source, display, Path(scratch), known_images, max_unreadable_fraction)
        raise_if_overlapping(external.audit, display)
        log.info("external set %s: %s images (NORMAL, PNEUMONIA), %d patients", display,
                 external.audit["images"], external.audit["patients"])
        with atomic_path(target, directory=True) as out:
            meta = write_records({SPLIT: external.records}, out, image_size, config,
                                 extra_meta={"source": display, "audit": external.audit})
            # Names and digests, not the scratch paths: the set's lineage (shards hold file names too).
            write_manifest(out / "manifest.csv", [
                Record(f"{CLASS_NAMES[r.label]}/{Path(r.path).name}", r.label, r.patient_id, r.sha256, SPLIT)
                for r in external.records])
    return meta["audit"]

