"""params.yaml parsed once into typed, validated config objects.

Every stage calls `load_params()` first, so a typo, a wrong type or an impossible combination
stops the stage before any heavy work, with a message naming the key, the value and what is allowed.
"""

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pneumonia import paths
from pneumonia.errors import PipelineError
from pneumonia.models.registry import CUSTOM_CNN, MODEL_NAMES, min_image_size


class Section(BaseModel):
    # Unknown keys are errors: a misspelt param must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticConfig(Section):
    patients_per_class: int = Field(12, ge=4)
    images_per_patient: int = Field(3, ge=1)
    image_size: int = Field(96, ge=32, le=1024)


class DataConfig(Section):
    source: Literal["kaggle", "local", "synthetic"] = "kaggle"
    kaggle_dataset: str = Field("paultimothymooney/chest-xray-pneumonia", pattern=r"^[\w.-]+/[\w.-]+$")
    local_path: str = "../shared/datasets/chest-xray-sample.zip"
    image_size: int = Field(160, ge=32, le=1024)
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 42
    synthetic: SyntheticConfig = SyntheticConfig()

    def local_archive(self) -> Path:
        """The existing file or folder named by data.local_path, or a PipelineError saying what to do."""
        path = paths.resolve_user_path(self.local_path)
        if not path.exists():
            raise PipelineError(
                f"params.yaml: data.local_path = {self.local_path!r} does not exist (looked at {path}).\n"
                "Point it to the Kaggle archive (a .zip, or the unpacked folder with train/ and test/), "
                "e.g. `dvc exp run -S data.local_path=/path/to/chest-xray-pneumonia.zip`, "
                "or use data.source: kaggle or synthetic."
            )
        return path


class TFRecordsConfig(Section):
    images_per_shard: int = Field(512, ge=1)
    workers: int = Field(0, ge=0)  # 0: one per CPU core
    jpeg_quality: int = Field(95, ge=50, le=100)


class ModelConfig(Section):
    name: str = CUSTOM_CNN
    weights: str = "none"  # "imagenet", "none" or a path to a weights file
    head_units: int = Field(128, ge=0)  # backbones: dense units before the output (0: none)
    dropout: float = Field(0.3, ge=0, lt=1)

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown model; allowed: {', '.join(MODEL_NAMES)}")
        return name

    @model_validator(mode="after")
    def _weights_fit_model(self) -> "ModelConfig":
        if self.name == CUSTOM_CNN and self.weights != "none":
            raise ValueError(
                f"model.weights = {self.weights!r}: custom_cnn is trained from scratch, set model.weights to 'none'"
            )
        return self

    def weights_file(self) -> Path | None:
        """The weights file named by model.weights, when it names one."""
        if self.weights in ("none", "imagenet"):
            return None
        path = paths.resolve_user_path(self.weights)
        if not path.is_file():
            raise PipelineError(
                f"params.yaml: model.weights = {self.weights!r} is neither 'imagenet', 'none' nor an "
                f"existing weights file (looked at {path})."
            )
        return path


class TrainConfig(Section):
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    lr_decay_rate: float = Field(0.9, gt=0, le=1)  # exponential decay, applied per epoch
    class_weight: Literal["balanced", "none"] = "balanced"
    early_stopping_patience: int = Field(5, ge=1)
    monitor: Literal["val_auc", "val_loss"] = "val_auc"
    seed: int = 42


class EvaluateConfig(Section):
    threshold: float = Field(0.5, gt=0, lt=1)


class TrackingConfig(Section):
    experiment: str = Field("pneumonia", min_length=1)


class Params(Section):
    data: DataConfig = DataConfig()
    tfrecords: TFRecordsConfig = TFRecordsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _image_fits_model(self) -> "Params":
        smallest = min_image_size(self.model.name)
        if self.data.image_size < smallest:
            raise ValueError(
                f"data.image_size = {self.data.image_size} is below the {smallest}px minimum of "
                f"model {self.model.name!r}; raise data.image_size"
            )
        return self


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling against params.yaml in the repository)"
    if not error["loc"] or isinstance(error["input"], dict):
        return message  # a check across keys: its message names them
    return f"{key} = {error['input']!r}: {message}"


def parse_params(raw: dict[str, Any], source: str = str(paths.PARAMS)) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(error)}" for error in exc.errors())
        raise PipelineError(f"{source} has invalid params:\n{problems}") from None


def load_params(path: Path = paths.PARAMS) -> Params:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the stage from the repository root") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(raw, str(path))


def flatten(params: Params) -> dict[str, Any]:
    """params as {'data.image_size': 160, ...}, e.g. for MLflow."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = value

    walk("", params.model_dump())
    return flat
