"""Input checks from a file's header: is this image within the model's intended use (a frontal chest X-ray
of a young child, at the resolution the model reads)? A DICOM header says body part, view and age; JPEG and
PNG carry no such header; every format says its size. The out-of-distribution score (pneumonia.ood) judges
every image by its pixels.

Each reason from a DICOM header names the attribute and the expected range, never the value found (the header
is the patient's): "patient age outside 0-5 years", not the age.
"""

from collections.abc import Sequence
from pathlib import Path

from pneumonia.data import dicom, images
from pneumonia.errors import PipelineError

CHEST = {"CHEST", "THORAX", "LUNG", "PORT CHEST"}  # DICOM PS3.16 CID 4031 and what modalities write for it
FRONTAL = {"AP", "PA"}  # ViewPosition: anything else (LL, RL, lateral decubitus, oblique) is not frontal
AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}  # PatientAge is nnnD, nnnW, nnnM or nnnY


class OutsideIntendedUse(PipelineError):
    """An input the checks refuse (evaluate.input_checks: refuse); the message gives the reasons."""


def _age_years(age: str) -> float | None:
    age = age.strip().upper()
    if len(age) < 2 or age[-1] not in AGE_UNITS or not age[:-1].isdigit():
        return None  # absent or malformed: nothing to judge by (anonymised archives often blank it)
    return int(age[:-1]) * AGE_UNITS[age[-1]]


def header_reasons(source: bytes | str | Path, age_years: Sequence[int]) -> list[str]:
    """Why a DICOM file's header says it is outside the intended use; [] for one within it, or for JPEG/PNG."""
    if not dicom.is_dicom(source):
        return []
    import io

    import pydicom
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE  # its warnings would quote header values
    try:
        header = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source,
                                 stop_before_pixels=True, specific_tags=["BodyPartExamined", "ViewPosition",
                                                                         "PatientAge"])
    except Exception:  # noqa: BLE001 - reading the image (pneumonia.data.dicom) says what is wrong with it
        return []
    reasons = []
    body_part = str(header.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and body_part not in CHEST:
        reasons.append("body part examined is not the chest (DICOM BodyPartExamined)")
    view = str(header.get("ViewPosition", "") or "").strip().upper()
    if view and view not in FRONTAL:
        reasons.append("not a frontal view: lateral or other (DICOM ViewPosition is not AP or PA)")
    age = _age_years(str(header.get("PatientAge", "") or ""))
    youngest, oldest = age_years
    if age is not None and not youngest <= age < oldest + 1:
        reasons.append(f"patient age outside {youngest}-{oldest} years (DICOM PatientAge)")
    return reasons


def resolution_reasons(source: bytes | str | Path, image_size: int) -> list[str]:
    """Why `source` is too small for a model of `image_size` px inputs; [] for one that is not, or whose header
    cannot be read (decoding it says what is wrong).

    Under the model's input size an image is enlarged, and the blur of enlarging reads as opacity: on the
    validation X-rays of the committed baseline, shrunk to 96 px a side then enlarged, 23% of the normal ones
    were called pneumonia (3% at full size), at 64 px 45%, at 32 px all; the out-of-distribution score flagged
    1% (benchmarks/small_images.md). The samples' training X-rays are 224 px: each was made smaller, none larger."""
    try:
        width, height = images.dimensions(source)
    except Exception:  # noqa: BLE001 - not an image this can size: decoding it says why
        return []
    if min(width, height) >= image_size:
        return []
    return [f"smaller than the model's {image_size} px input ({width} x {height} px): enlarged, its blur reads as "
            "opacity; send the X-ray at full resolution"]


def reasons(source: bytes | str | Path, age_years: Sequence[int], image_size: int) -> list[str]:
    """Every reason to flag `source`: its DICOM header's, then its size's."""
    return header_reasons(source, age_years) + resolution_reasons(source, image_size)


def checked(source: bytes | str | Path, policy: str, age_years: Sequence[int], image_size: int) -> list[str]:
    """The reasons to flag `source` under `policy` (evaluate.input_checks): flag returns them, refuse raises
    OutsideIntendedUse with them, ignore checks nothing."""
    if policy == "ignore":
        return []
    found = reasons(source, age_years, image_size)
    if found and policy == "refuse":
        raise OutsideIntendedUse("outside the model's intended use: " + "; ".join(found) +
                                 " (the model reads frontal chest X-rays of young children; "
                                 "evaluate.input_checks: flag to predict and flag such images instead)")
    return found
