"""Everything needed to use a trained model as the pipeline evaluated it, written once beside the model.

A model is a bundle of four files sharing a stem: `<stem>.keras` (the train stage's Keras model),
`<stem>.json` (these settings: threshold and the rule that chose it, input size, normalisation, test-time
views, the TFRecords' JPEG quality, class names, input checks, the out-of-distribution flag's threshold,
intended use, training data digest, git commit), `<stem>.ood.npz` (the out-of-distribution reference,
pneumonia.ood) and `<stem>.onnx` (the same network for ONNX Runtime, pneumonia.engines; a bundle without it
predicts with Keras). The evaluate stage writes the last three as models/model.json, models/model.ood.npz and
models/model.onnx; `pneumonia predict`, serving, the MLflow model and `adapt` read them from there, and a copy
of models/ works anywhere (docs/decisions.md "The model bundle").

Bottom layer: pydantic only, no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pneumonia import paths
from pneumonia.errors import NOT_A_ZIP, PipelineError, damaged_model

SETTINGS_FORMAT = 1  # of the settings file; a reader refuses others
MODEL_FILE = "model.keras"  # the model in a bundle folder (models/)
OOD_SUFFIX = ".ood.npz"
ONNX_SUFFIX = ".onnx"

InputCheckPolicy = Literal["flag", "refuse", "ignore"]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IntendedUse(Frozen):
    """What the model is for, in words a user reads (the model card's first section)."""

    purpose: str = ("Decision support: the probability of pneumonia on a frontal chest X-ray, and a NORMAL or "
                    "PNEUMONIA label at the operating point below. Not a diagnosis: a clinician reads every image.")
    population: str = ("Frontal (PA/AP) chest X-rays of children aged 1 to 5 years, from one hospital "
                       "(Guangzhou Women and Children's Medical Center; Kermany et al., Cell 2018).")
    not_for: tuple[str, ...] = (
        "adults or older children (on adult X-rays it calls most normal images pneumonia)",
        "lateral views, other body parts, CT, MR, photographs or scanned documents",
        "telling bacterial from viral pneumonia, or any other finding",
    )
    age_years: tuple[int, int] = (0, 5)  # PatientAge outside it is flagged (input checks)
    model_card: str = paths.MODEL_CARD.as_posix()  # in the repository that trained the model


class CalibrationSettings(Frozen):
    """`logit(p') = scale * logit(p) + shift` (pneumonia.evaluation.calibration): the threshold is on p'."""

    method: Literal["none", "temperature", "platt"] = "none"
    scale: float = Field(1.0, gt=0)
    shift: float = 0.0


class OodSettings(Frozen):
    method: str
    threshold: float = Field(gt=0)  # a score above it is flagged
    validation_flagged: float = Field(ge=0, le=1)  # share of validation images flagged at it


class TrainingData(Frozen):
    source: str  # data.source
    archive_sha256: str | None  # of the archive the images came from (data/raw/source.json)
    manifests_sha256: str  # of the split manifests: which images trained, validated, tested
    images: dict[str, int]  # per split


def training_data(source: str, raw_source: Path, split_counts: Path, manifests_sha256: str) -> TrainingData:
    """The training data's record from the download stage's data/raw/source.json and prepare's split counts."""
    import json

    images = json.loads(split_counts.read_text())["images"]
    return TrainingData(source=source, archive_sha256=json.loads(raw_source.read_text()).get("archive_sha256"),
                        manifests_sha256=manifests_sha256,
                        images={split: sum(classes.values()) for split, classes in images.items()})


def model_digest(model: Path) -> str:
    """sha256 of a .keras file: binds the settings to the model they were made for."""
    import hashlib

    with open(model, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def onnx_digest(onnx: bytes) -> str:
    """sha256 of a .onnx file's bytes: binds it to the settings, and so to the .keras file, it was exported with."""
    import hashlib

    return hashlib.sha256(onnx).hexdigest()


class ModelSettings(Frozen):
    format: Literal[1] = SETTINGS_FORMAT
    model_sha256: str  # of the .keras file these settings belong to (model_digest)
    onnx_sha256: str | None = None  # of the <stem>.onnx exported from it (onnx_digest); None: written without one
    model_name: str
    class_names: tuple[str, str]
    image_size: int = Field(ge=1)
    input_norm: str  # inside the model; recorded for the reader
    crop: float  # inside the model (model.crop); recorded for the reader
    jpeg_quality: int = Field(ge=1, le=100)  # inputs are re-encoded as the TFRecords were
    tta_views: Literal[1, 3, 9]
    threshold: float = Field(ge=0, le=1)
    threshold_rule: str  # evaluate.threshold, chosen on validation
    calibration: CalibrationSettings = CalibrationSettings()  # evaluate.calibration, fitted on validation
    input_checks: InputCheckPolicy  # what a DICOM header outside the intended use does
    ood: OodSettings
    intended_use: IntendedUse = IntendedUse()
    training_data: TrainingData
    git_commit: str | None
    adapted: str | None = None  # how `pneumonia adapt` changed the model, None for the pipeline's

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def model_file(path: Path) -> Path:
    """The .keras file of a bundle named by its folder (models/) or by the file itself."""
    return path / MODEL_FILE if path.is_dir() or (not path.exists() and path.suffix != ".keras") else path


def settings_file(model: Path) -> Path:
    return model.with_suffix(".json")


def ood_file(model: Path) -> Path:
    return model.with_suffix(OOD_SUFFIX)


def onnx_file(model: Path) -> Path:
    return model.with_suffix(ONNX_SUFFIX)


def read_settings(model: Path) -> ModelSettings:
    """The settings beside the .keras file `model`; a PipelineError saying what to do when they are missing or
    not this version's."""
    path = settings_file(model)
    if not path.is_file():
        raise PipelineError(
            f"{model} has no settings file {path.name} beside it (threshold, input size, out-of-distribution "
            f"reference): it was trained before models carried their settings, or copied without them. Copy the "
            f"whole models/ folder ({MODEL_FILE}, model.json, model{OOD_SUFFIX}, model{ONNX_SUFFIX}), or run the "
            "evaluate stage again (`dvc repro`) to write them")
    return read_settings_file(path)


def check_belongs(settings: ModelSettings, model: Path) -> None:
    """A PipelineError when `settings` were not made for the .keras file `model` (or it is not a whole one)."""
    import zipfile

    if settings.model_sha256 != model_digest(model):
        if not zipfile.is_zipfile(model):
            raise damaged_model(model, NOT_A_ZIP)
        raise PipelineError(
            f"{settings_file(model).name} beside {model} belongs to another model (its model_sha256 is not this "
            "file's): the model was replaced after its evaluation, or the files come from different runs. Copy one "
            "run's whole models/ folder, or run the evaluate stage again (`dvc repro`)")


def checked_onnx(settings: ModelSettings, model: Path) -> bytes | None:
    """The bytes of the .onnx file beside the .keras file `model`, None without one; a PipelineError when it
    was not exported with the model `settings` belong to (a stray or stale copy)."""
    path = onnx_file(model)
    if not path.is_file():
        return None
    onnx = path.read_bytes()
    if settings.onnx_sha256 != onnx_digest(onnx):
        raise PipelineError(
            f"{path} belongs to another model (its sha256 is not the onnx_sha256 of {settings_file(model).name}): "
            "it was copied from another run or left from an earlier one. Copy one run's whole models/ folder, "
            f"run the evaluate stage again (`dvc repro`), or delete {path.name} to predict with {model.name}")
    return onnx


def read_settings_file(path: Path) -> ModelSettings:
    try:
        return ModelSettings.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the file"
        raise PipelineError(f"{path} is not a model settings file of this version ({where}: {first['msg']}): "
                            "run the evaluate stage again (`dvc repro`) or restore the file") from None


def write_beside(model: Path, settings: ModelSettings, ood, onnx: bytes | None = None) -> None:
    """The settings, out-of-distribution reference (pneumonia.ood.OodReference) and ONNX graph
    (engines.onnx_model's; None: none, and an earlier one removed) of the .keras file `model`, beside it, each
    file atomically; the settings last, so settings that exist belong to a whole bundle."""
    from pneumonia import atomic

    ood.save(ood_file(model))
    if onnx is None:
        onnx_file(model).unlink(missing_ok=True)
    else:
        with atomic.atomic_path(onnx_file(model)) as temporary:
            temporary.write_bytes(onnx)
    settings = settings.model_copy(update={"onnx_sha256": None if onnx is None else onnx_digest(onnx)})
    atomic.write_text(settings_file(model), settings.to_json())


def write_bundle(model: Path, save_model: Callable[[Path], Any], settings: ModelSettings, ood,
                 onnx: bytes | None) -> None:
    """A whole bundle at the .keras path `model`: save_model(path) writes the Keras model, then write_beside
    with `settings` bound to it."""
    from pneumonia import atomic

    with atomic.atomic_path(model) as written:
        save_model(written)
    write_beside(model, settings.model_copy(update={"model_sha256": model_digest(model)}), ood, onnx)
