"""An external validation set: X-rays of another site (JPEG, PNG, TIFF or DICOM) in a zip or a folder
(evaluate.external), labelled by `{NORMAL,PNEUMONIA}/` folders or by a labels CSV (the RSNA
challenge's layout among them), made into model input exactly as the training images are.

It stands for "another hospital": the model is scored on it, never trained, early-stopped or
checkpointed on it. Every file is read, hashed and decoded like the pipeline's own images
(`audit.inspect_file`); an image whose content is also in train, val or test fails the audit, since
the set would no longer be external. The readable images become TFRecords through the same writer
as the splits (`tfrecords.write_records`), so decoding and resizing are one code path.
"""

import csv
import io
import logging
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pneumonia import CLASS_NAMES, EXTERNAL_SPLIT as SPLIT
from pneumonia.atomic import atomic_path, write_json
from pneumonia.config import TFRecordsConfig
from pneumonia.data import input_checks
from pneumonia.data.archive import check_free_space, extract, open_zip
from pneumonia.data.audit import check_unreadable, inspect_file, read_image_table
from pneumonia.data.layout import has_image_suffix, hashed_name, in_folder, in_zip, is_macos_litter
from pneumonia.data.manifest import Record, write_manifest
from pneumonia.data.prepare import patient_id
from pneumonia.data.tfrecords import META, write_records
from pneumonia.errors import PipelineError
from pneumonia.model_settings import IntendedUse

log = logging.getLogger(__name__)

LAYOUT_HINT = ("Expected a zip or folder with NORMAL/ and PNEUMONIA/ folders of images (JPEG, PNG, TIFF or DICOM), "
               "e.g. external/NORMAL/a.jpeg, external/PNEUMONIA/b.dcm; or images with a labels CSV of columns "
               "path (relative to the CSV) or id (file name without suffix) and label (NORMAL/PNEUMONIA or 0/1), "
               "e.g. the RSNA challenge's stage_2_train_images/ with stage_2_train_labels.csv (Target).")
ID_COLUMNS = ("path", "id", "patientid")  # lower case; patientId: the RSNA challenge's
LABEL_COLUMNS = ("label", "target")  # Target: the RSNA challenge's, 1 = pneumonia
POSITIVE, NEGATIVE = ("PNEUMONIA", "1", "TRUE"), ("NORMAL", "0", "FALSE")


@dataclass(frozen=True)
class ExternalSet:
    records: list[Record]  # readable images, paths into the scratch folder they were read from
    audit: dict  # counts, unreadable files, overlap with train/val/test (must be none)


def class_images(names: list[str]) -> dict[str, list[tuple[str, int]]]:
    """{root: [(name, label), ...]} of the images (`names`: image files) directly inside a NORMAL/ or
    PNEUMONIA/ folder."""
    roots: dict[str, list[tuple[str, int]]] = {}
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) < 2:
            continue
        class_name = parts[-2].upper()
        if class_name in CLASS_NAMES:
            roots.setdefault("/".join(parts[:-2]), []).append((name, CLASS_NAMES.index(class_name)))
    return roots


def locate_images(images: list[str], source: str) -> list[tuple[str, int]]:
    """The (name, label) pairs of the one root holding NORMAL/ and PNEUMONIA/ folders of `images`."""
    roots = class_images(images)
    if not roots:
        raise PipelineError(f"evaluate.external = {source!r} has no NORMAL/ or PNEUMONIA/ folder of images "
                            "and no labels CSV. " + LAYOUT_HINT)
    if len(roots) > 1:
        listed = ", ".join(f"'{root or '.'}'" for root in sorted(roots))
        raise PipelineError(f"evaluate.external = {source!r} has NORMAL/PNEUMONIA folders under several roots "
                            f"({listed}): which one is the external set is ambiguous. Point evaluate.external "
                            "at a zip or folder with a single such pair.")
    (root, images), = roots.items()
    return _with_both_classes(sorted(images), source, f"under '{root or '.'}'")


def _with_both_classes(images: list[tuple[str, int]], source: str, where: str) -> list[tuple[str, int]]:
    missing = [name for label, name in enumerate(CLASS_NAMES) if not any(lab == label for _, lab in images)]
    if missing:
        raise PipelineError(f"evaluate.external = {source!r} has no {' or '.join(missing)} images {where}: "
                            "ROC AUC, sensitivity and specificity need both classes. " + LAYOUT_HINT)
    return images


def _label(value: str, csv_name: str, row: int) -> int:
    text = value.strip().upper()
    if text in POSITIVE:
        return 1
    if text in NEGATIVE:
        return 0
    raise PipelineError(f"{csv_name}, row {row}: the label {value!r} is neither pneumonia ({', '.join(POSITIVE)}) "
                        f"nor normal ({', '.join(NEGATIVE)}). Fix the labels CSV.")


def _column(header: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((column for column in header if column.strip().lower() in candidates), None)


def csv_labelled_images(names: list[str], images: list[str], read_text: Callable[[str], str],
                        source: str) -> list[tuple[str, int]]:
    """(name, label) of the images a labels CSV names: the one CSV among `names` with an id column
    (path, id or patientId) and a label column (label or Target). A path is relative to the CSV's
    folder; an id is an image's file name without its suffix, anywhere under that folder. An image
    with several rows (RSNA: one row per box) is pneumonia if any row says so; images without a row
    are left out."""
    tables = {}
    for name in names:
        if name.lower().endswith(".csv") and not is_macos_litter(name):
            rows = list(csv.reader(io.StringIO(read_text(name))))
            if rows and _column(rows[0], ID_COLUMNS) and _column(rows[0], LABEL_COLUMNS):
                tables[name] = rows
    if not tables:
        raise PipelineError(f"evaluate.external = {source!r} has no NORMAL/ or PNEUMONIA/ folder of images and no "
                            "labels CSV. " + LAYOUT_HINT)
    if len(tables) > 1:
        raise PipelineError(f"evaluate.external = {source!r} has several labels CSVs ({', '.join(sorted(tables))}): "
                            "which one labels the set is ambiguous. Keep one.")
    (csv_name, (header, *rows)), = tables.items()
    folder = PurePosixPath(csv_name).parent
    id_column, label_column = header.index(_column(header, ID_COLUMNS)), header.index(_column(header, LABEL_COLUMNS))
    by_path = header[id_column].strip().lower() == "path"
    under = [name for name in images if PurePosixPath(name).is_relative_to(folder)]  # any name, for folder "."
    if by_path:
        known = {name: name for name in under}
        key = lambda text: (folder / text.strip()).as_posix()  # noqa: E731 - PurePosixPath(".") / "a" is "a"
    else:
        known = {}
        for name in under:
            stem = PurePosixPath(name).name
            stem = stem[:-len(PurePosixPath(stem).suffix)] if has_image_suffix(stem) else stem
            if stem in known:
                raise PipelineError(f"evaluate.external = {source!r}: {known[stem]} and {name} have the same id "
                                    f"{stem!r}, so {csv_name}'s rows cannot tell them apart. Use a path column.")
            known[stem] = name
        key = str.strip
    labels: dict[str, int] = {}
    unmatched = 0
    for number, row in enumerate(rows, start=2):
        if len(row) <= max(id_column, label_column):
            continue  # a blank line
        image = known.get(key(row[id_column]))
        if image is None:
            unmatched += 1
            continue
        labels[image] = max(labels.get(image, 0), _label(row[label_column], csv_name, number))
    if unmatched:
        log.warning("%s: %d row(s) name no image of the set (left out)", csv_name, unmatched)
    if unlabelled := len(under) - len(labels):
        log.info("%s: %d image(s) under %s have no row (left out)", csv_name, unlabelled, folder.as_posix())
    return _with_both_classes(sorted(labels.items()), source, f"labelled in {csv_name}")


def labelled_images(names: list[str], is_image: Callable[[str], bool], read_text: Callable[[str], str],
                    source: str) -> list[tuple[str, int]]:
    """(name, label) of the external set's images: NORMAL/ and PNEUMONIA/ folders, else a labels CSV."""
    images = [name for name in names if not is_macos_litter(name) and not name.lower().endswith(".csv")
              and is_image(name)]
    if class_images(images):
        return locate_images(images, source)
    return csv_labelled_images(names, images, read_text, source)


def _copy_images(source: Path, display: str, out: Path, hash_names: bool) -> list[tuple[Path, int, str]]:
    """(copy, label, name in the source) of the labelled images of a zip or folder, copied to
    `out`/<CLASS>/<name> (its layout.hashed_name with `hash_names`) once their sizes are known to fit
    (data.archive's guards; symbolic links in a folder are not followed: an external set is files, not
    pointers elsewhere)."""
    def planned(images: list[tuple[str, int]]) -> list[tuple[str, Path, int]]:
        targets = []
        # By class, then file name: the same images give the same records in any layout.
        for name, label in sorted(images, key=lambda image: (image[1], PurePosixPath(image[0]).name)):
            base = PurePosixPath(name).name
            target = out / CLASS_NAMES[label] / (hashed_name(base) if hash_names else base)
            if any(target == other for _, other, _ in targets):
                raise PipelineError(f"evaluate.external = {display!r} has two images named {base!r}: "
                                    "rename one (images are kept by file name).")
            targets.append((name, target, label))
        return targets

    if source.is_dir():
        names = [path.relative_to(source).as_posix() for path in source.rglob("*")
                 if path.is_file() and not path.is_symlink()]
        images = planned(labelled_images(names, in_folder(source),
                                         lambda name: (source / name).read_text(errors="replace"), display))
        check_free_space(sum((source / name).stat().st_size for name, _, _ in images), out, f"the folder {source}")
        for name, target, _ in images:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target)
    else:
        with open_zip(source, f"evaluate.external = {display!r}",
                      "Copy it again, or point evaluate.external at the unpacked folder.") as archive:
            infos = {info.filename: info for info in archive.infolist() if not info.is_dir()}
            images = planned(labelled_images(list(infos), in_zip(archive),
                                             lambda name: archive.read(name).decode(errors="replace"), display))
            extract(archive, [(infos[name], target) for name, target, _ in images], out, f"the archive {source}")
    return [(target, label, name) for name, target, label in images]


def read_external(source: Path, display: str, scratch: Path, known_images: Path, image_size: int,
                  max_unreadable_fraction: float, checks: str = "flag", hash_names: bool = False) -> ExternalSet:
    """Copy, hash and decode the external images into `scratch`; check them against the pipeline's
    own images (data/images.csv, every raw file with its sha256) and their headers (DICOM attributes, a size
    under `image_size`) against the intended use (`checks`, evaluate.input_checks: flagged images are counted,
    refused ones left out)."""
    if not source.exists():
        raise PipelineError(f"params.yaml: evaluate.external = {display!r} does not exist (looked at {source}). "
                            "Point it at a zip or folder of NORMAL/ and PNEUMONIA/ images, or set it to '' "
                            "to evaluate without an external set.")
    if not source.is_dir() and not zipfile.is_zipfile(source):
        raise PipelineError(f"evaluate.external = {display!r} is neither a folder nor a zip archive. " + LAYOUT_HINT)
    copied = _copy_images(source, display, scratch, hash_names)
    facts = [inspect_file(path, SPLIT, label) for path, label, _ in copied]
    # Listed as the user knows them (the copies are in a scratch folder that is gone once this fails)
    shown = {path.as_posix(): f"{display}: {name}" for path, _, name in copied}
    unreadable = check_unreadable(facts, max_unreadable_fraction, shown,
                                  f"Export them again into evaluate.external = {display!r}")
    readable = [fact for fact in facts if not fact.error]
    reasons = {} if checks == "ignore" else {
        fact.path: input_checks.reasons(fact.path, IntendedUse().age_years, image_size) for fact in readable}
    outside = {path: found for path, found in reasons.items() if found}
    if checks == "refuse":
        readable = [fact for fact in readable if fact.path not in outside]

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
        # Images outside the intended use by their headers (DICOM attributes, size): how many, and why
        # (evaluate.input_checks)
        "input_checks": {"policy": checks, "outside_intended_use": len(outside),
                         "refused": len(outside) if checks == "refuse" else 0,
                         "reasons": dict(sorted(Counter(reason for found in outside.values()
                                                        for reason in found).items()))},
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
                   config: TFRecordsConfig, max_unreadable_fraction: float, checks: str = "flag",
                   hash_names: bool = False) -> dict:
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
        external = read_external(source, display, Path(scratch), known_images, image_size, max_unreadable_fraction,
                                 checks, hash_names)
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

