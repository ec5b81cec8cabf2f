"""The compact sample kept in the repository (data_sample/), drawn from an archive in the Kaggle layout.

Drawn by patient (every image of a drawn patient, none of the others, so no patient is split),
stratified (the same share of patients of each class in each split), deterministic (the same
archive, shares and seed give a byte-identical zip: sorted members, fixed timestamps, images
stored as they are, not re-encoded).
"""

import hashlib
import random
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pneumonia.atomic import atomic_path
from pneumonia.data.archive import check_free_space, open_zip
from pneumonia.data.layout import locate_splits
from pneumonia.data.prepare import patient_id
from pneumonia.errors import PipelineError

# Share of the patients of each class kept per split: the test split gets a larger share so that
# its metrics have usable confidence intervals; Kaggle's 16-image val split is kept whole.
DEFAULT_FRACTIONS = {"train": 0.2, "val": 1.0, "test": 0.4}
DEFAULT_SEED = 15
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can record: no build time in the bytes


@dataclass(frozen=True)
class SampleSummary:
    images: dict[str, dict[str, int]]  # split -> class -> images
    patients: dict[str, dict[str, int]]  # split -> class -> patients
    size_bytes: int
    sha256: str


def draw(names: list[str], fractions: dict[str, float], seed: int) -> dict[tuple[str, str], list[str]]:
    """The archive member names kept, per (split, class): whole patients, the same share of each class."""
    kept: dict[tuple[str, str], list[str]] = {}
    for (split, class_name), members in locate_splits(names).items():
        by_patient: dict[str, list[str]] = defaultdict(list)
        for name in members:
            by_patient[patient_id(PurePosixPath(name).name)].append(name)
        patients = sorted(by_patient)
        random.Random(f"{seed}/{split}/{class_name}").shuffle(patients)
        count = max(1, round(fractions[split] * len(patients)))
        kept[(split, class_name)] = sorted(name for patient in patients[:count] for name in by_patient[patient])
    return kept


def build_sample(archive: Path, out: Path, fractions: dict[str, float] | None = None,
                 seed: int = DEFAULT_SEED) -> SampleSummary:
    """Write the sample zip `out` (layout chest_xray/{split}/{class}/) from the Kaggle-layout `archive`."""
    fractions = {**DEFAULT_FRACTIONS, **(fractions or {})}
    for split, fraction in fractions.items():
        if not 0 < fraction <= 1:
            raise PipelineError(f"the share of {split} patients must be in (0, 1], got {fraction}")
    if not archive.is_file():
        raise PipelineError(f"{archive} not found: give the Kaggle archive (or a zip in its layout), "
                            "e.g. ../shared/datasets/chest-xray-sample.zip")
    if out.resolve() == archive.resolve() or (out.exists() and out.samefile(archive)):
        raise PipelineError(f"the sample {out} would write over its input {archive}, whose images it is drawn "
                            "from: give --out another path (it defaults to the committed sample, data_sample/).")
    images: dict[str, dict[str, int]] = defaultdict(dict)
    patients: dict[str, dict[str, int]] = defaultdict(dict)
    with open_zip(archive, str(archive), "Copy it again.") as source:
        kept = draw([info.filename for info in source.infolist() if not info.is_dir()], fractions, seed)
        # Stored as they are: the sample takes the kept members' declared sizes.
        check_free_space(sum(source.getinfo(member).file_size for members in kept.values() for member in members),
                         out, f"the archive {archive}")
        with atomic_path(out) as temporary, zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED) as sample:
            for (split, class_name), members in sorted(kept.items()):
                images[split][class_name] = len(members)
                patients[split][class_name] = len({patient_id(PurePosixPath(m).name) for m in members})
                for member in members:
                    info = zipfile.ZipInfo(f"chest_xray/{split}/{class_name}/{PurePosixPath(member).name}",
                                           date_time=FIXED_TIME)
                    info.external_attr = 0o644 << 16
                    sample.writestr(info, source.read(member))  # JPEG bytes as they are: no re-encoding
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    return SampleSummary(dict(images), dict(patients), out.stat().st_size, digest)
