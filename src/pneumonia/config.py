"""params.yaml parsed once into typed, validated config objects.

Every stage calls `load_params()` first, so a typo, a wrong type or an impossible combination
stops the stage before any heavy work, with a message naming the key, the value and what is allowed.

The ground floor: `load_params` reads params.yaml, and nothing else is read: no path named in it is
looked at here. It imports only the bottom modules (paths for the default locations, errors,
architectures and threshold_rule for the allowed values); the modules that use a section resolve the
paths in it (data.download: data.local_path, models.build: model.weights).
"""

import copy
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from pneumonia import paths
from pneumonia.architectures import CUSTOM_CNN, MODEL_NAMES, min_image_size
from pneumonia.errors import PipelineError
from pneumonia.threshold_rule import parse_threshold_rule


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a number is required, not true/false")
    return value


# Strict where lax parsing hides a mistake (`epochs: true` read as 1, `deterministic: "yes"` as true);
# floats stay lax for strings because YAML 1.1 reads `1e-4` as one.
Float = Annotated[float, BeforeValidator(_not_bool)]
NonEmptyStr = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
MAX_SEED = 2**32 - 1  # NumPy's legacy seeding (np.random.seed, keras.utils.set_random_seed, scikit-learn) takes no more


def seed_in_range(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"a seed is an integer from 0 to {MAX_SEED} (2**32 - 1), the range NumPy's seeding takes")
    return seed


Seed = Annotated[StrictInt, AfterValidator(seed_in_range)]
# train.ensemble_members at most: each member is a whole training (and a whole forward pass when predicting)
MAX_ENSEMBLE_MEMBERS = 10
# MLflow's database stores keep experiment and registered-model names of up to 256 characters
MLFLOW_NAME_LENGTH = 256


class Section(BaseModel):
    # Every default is the committed params.yaml's value (tests/test_config.py checks it): a key left out of
    # a params file means what params.yaml says. Unknown keys are errors: a misspelt param must not be silently
    # ignored; inf and nan are never a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SyntheticConfig(Section):
    patients_per_class: StrictInt = Field(12, ge=4)
    images_per_patient: StrictInt = Field(3, ge=1)
    image_size: StrictInt = Field(96, ge=32, le=1024)


class DataConfig(Section):
    source: Literal["kaggle", "local", "synthetic"] = "local"
    # owner/name (the current version) or owner/name/N (version N, pinned)
    kaggle_dataset: str = Field("paultimothymooney/chest-xray-pneumonia", pattern=r"^[\w.-]+/[\w.-]+(/\d+)?$")
    local_path: NonEmptyStr = str(paths.SAMPLE)  # the sample committed in data_sample/
    image_size: StrictInt = Field(128, ge=32, le=1024)
    val_fraction: Float = Field(0.15, gt=0, lt=0.5)
    seed: Seed = 42
    # prepare skips unreadable images, but fails when more than this fraction of them is unreadable
    max_unreadable_fraction: Float = Field(0.01, ge=0, le=1)
    # Store images (data/raw, the external set) under a hash of their file name: PACS exports are often
    # named by patient ID or accession number, and names go into manifests, TFRecords, tables and MLflow
    hash_file_names: StrictBool = False
    synthetic: SyntheticConfig = SyntheticConfig()


def storage_uri(value: Any, key: str, example: str, local: str) -> Any:
    """A params key naming a folder tf.io.gfile writes to (tfrecords.uri, train.backup_uri): "" (or
    no value in YAML) for the local default, else a URI with a scheme and a path, without a trailing
    slash. A path without a scheme would silently be a local folder relative to the stage's working
    directory, not the bucket meant."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return value  # pydantic reports the wrong type
    uri = value.strip().rstrip("/")
    if uri and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://.+", uri):
        raise ValueError(f"{key} must be a URI with a scheme and a path, e.g. {example} or file:///abs/path; "
                         f"{local} leave {key} empty")
    if uri.lower().startswith("file://") and not uri.lower().startswith("file:///"):
        # Relative file URIs are refused, not resolved: TensorFlow reads file://data/shards as host `data`,
        # path /shards, and a folder relative to the project is what the empty default already gives.
        raise ValueError(f"a file:// URI must be absolute, file:///abs/path (three slashes; TensorFlow takes what "
                         f"follows file:// up to the next slash for a host and would write under /); {local} leave "
                         f"{key} empty")
    return uri


class TFRecordsConfig(Section):
    images_per_shard: StrictInt = Field(512, ge=1)
    workers: StrictInt = Field(0, ge=0)  # 0: one per CPU core
    jpeg_quality: StrictInt = Field(95, ge=50, le=100)
    # "": the shards stay in data/tfrecords. A URI tf.io.gfile writes to (gs://bucket/path,
    # file:///abs/path): the shards go under <uri>/<content key>/, data/tfrecords keeps only meta.json.
    uri: str = ""

    @field_validator("uri", mode="before")
    @classmethod
    def _uri_with_scheme(cls, uri: Any) -> Any:
        return storage_uri(uri, "tfrecords.uri", "gs://bucket/pneumonia/tfrecords",
                           "for shards in the local data/tfrecords")


# `auto` in params.yaml (Params resolves it from model.name; `pneumonia check-params` shows the result):
# a pretrained backbone with head warm-up then fine-tuning for the backbone families, as the seed
# projects trained them; custom_cnn from scratch, its input standardised per image (docs/results.md:
# better on another site's X-rays), a backbone's as its pretrained weights expect.
AUTO = "auto"
PRETRAINED_RECIPE = {"weights": "imagenet", "warmup_epochs": 3, "fine_tune": "partial"}
FROM_SCRATCH_RECIPE = {"weights": "none", "warmup_epochs": 0, "fine_tune": "full"}


def resolve_auto(raw: Any) -> Any:
    """params with every `auto` replaced: model.weights imagenet for a backbone (none for custom_cnn);
    train.warmup_epochs and train.fine_tune per PRETRAINED_RECIPE when the resolved weights are
    pretrained (not none), per FROM_SCRATCH_RECIPE otherwise; no warm-up for a frozen backbone.
    (model.input_norm's auto is ModelConfig's own: it depends on model.name alone.)"""
    if not isinstance(raw, dict):
        return raw  # pydantic reports the wrong type
    # A section of another type (an empty `train:` is None) is pydantic's to report; the other one is still resolved.
    model, train = (dict(raw[key]) if isinstance(raw.get(key), dict) else {} for key in ("model", "train"))
    if model.get("weights") == AUTO:
        model["weights"] = (FROM_SCRATCH_RECIPE if model.get("name", CUSTOM_CNN) == CUSTOM_CNN
                            else PRETRAINED_RECIPE)["weights"]
    recipe = FROM_SCRATCH_RECIPE if model.get("weights", "none") == "none" else PRETRAINED_RECIPE
    if train.get("fine_tune") == AUTO:
        train["fine_tune"] = recipe["fine_tune"]
    if train.get("warmup_epochs") == AUTO:  # a frozen backbone has nothing to warm up for
        train["warmup_epochs"] = 0 if train.get("fine_tune") == "frozen" else recipe["warmup_epochs"]
    return {**raw, **{key: section for key, section in (("model", model), ("train", train))
                      if isinstance(raw.get(key), dict)}}


def auto_keys(raw: Any) -> list[str]:
    """The params.yaml keys set to `auto`."""
    return [f"{section}.{key}" for section, key in (("model", "weights"), ("model", "input_norm"),
                                                    ("train", "warmup_epochs"), ("train", "fine_tune"))
            if isinstance(raw, dict) and isinstance(raw.get(section), dict) and raw[section].get(key) == AUTO]


class ModelConfig(Section):
    name: str = CUSTOM_CNN
    weights: NonEmptyStr = "none"  # "imagenet", "none" or a path to a weights file (params.yaml: also "auto")
    head_units: StrictInt = Field(128, ge=0)  # backbones: dense units before the output (0: none)
    dropout: Float = Field(0.3, ge=0, lt=1)
    output: Literal["sigmoid", "softmax"] = "sigmoid"  # one pneumonia unit, or two units [NORMAL, PNEUMONIA]
    # Share of the image cut off each side before the network sees it: burned-in markers and
    # collimation edges sit in the border, and are a shortcut to the acquisition, not the lungs.
    crop: Float = Field(0.08, ge=0, lt=0.4)
    # custom_cnn's input scaling: "scale" ([0, 255] -> [0, 1]), "per_image" (zero mean, unit
    # variance per image: brightness and contrast of the acquisition removed) or "equalize" (each image's
    # histogram equalised: any increasing change of gray levels removed); backbones: "scale" only,
    # their own preprocessing (params.yaml: also "auto")
    input_norm: Literal["scale", "per_image", "equalize"] = "per_image"
    # custom_cnn: its convolutions' filters x this (1: the keras.io recipe's 16 to 256)
    width: Float = Field(1, gt=0, le=4)
    # custom_cnn's first block: "full_resolution" (the keras.io recipe: two 3x3 convolutions at the input's
    # resolution, then max pooling) or "strided" (a stride-2 3x3 convolution, then a 3x3 at half resolution: the
    # same shape out, half the training arithmetic)
    stem: Literal["full_resolution", "strided"] = "full_resolution"
    # custom_cnn's depth: separable convolutions in each of its four blocks after the stem (2: the recipe)
    convs_per_block: StrictInt = Field(2, ge=1, le=6)

    @model_validator(mode="before")
    @classmethod
    def _input_norm_for_the_network(cls, data: Any) -> Any:
        """input_norm auto, or not given: per_image for custom_cnn, scale for a backbone (its weights' own)."""
        if isinstance(data, dict) and data.get("input_norm", AUTO) == AUTO:
            data = {**data, "input_norm": "per_image" if data.get("name", CUSTOM_CNN) == CUSTOM_CNN else "scale"}
        return data

    @property
    def backbone(self) -> bool:
        """A pretrained-family network (keras.applications), not custom_cnn."""
        return self.name != CUSTOM_CNN

    def cropped_size(self, image_size: int) -> int:
        """Pixels a side the network sees of an `image_size` image, after model.crop."""
        return image_size - 2 * round(image_size * self.crop)

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
        if self.name != CUSTOM_CNN and self.input_norm != "scale":
            raise ValueError(
                f"model.input_norm = {self.input_norm!r} is for custom_cnn; {self.name} scales its input as its "
                "pretrained weights expect: set model.input_norm to 'scale'"
            )
        if self.name != CUSTOM_CNN:  # custom_cnn's architecture settings; a backbone has its weights' own
            for field, what in (("width", "width"), ("stem", "stem"), ("convs_per_block", "depth")):
                value, default = getattr(self, field), type(self).model_fields[field].default
                if value != default:
                    raise ValueError(f"model.{field} = {value!r} is for custom_cnn; {self.name} has its pretrained "
                                     f"weights' {what}: set model.{field} to {default!r}")
        return self


class AugmentConfig(Section):
    """Random augmentation while training; 0 (flip: none) disables each."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    zoom: Float = Field(0.25, ge=0, lt=1)  # up to this fraction in or out
    rotation: Float = Field(0.03, ge=0, le=0.5)  # up to this fraction of a full turn either way
    translation: Float = Field(0.08, ge=0, lt=1)  # up to this fraction of the image size, each axis
    contrast: Float = Field(0.2, ge=0, lt=1)  # contrast scaled by a factor in [1 - c, 1 + c]
    mixup: Float = Field(0, ge=0)  # > 0: pairs of images and their labels blended by a Beta(mixup, mixup) share
    # > 0: CutMix instead, a box of the pair's other image pasted in, its area 1 - a Beta(cutmix, cutmix) share
    cutmix: Float = Field(0, ge=0)
    # What another acquisition changes and per_image does not undo (contrast and brightness it does):
    gamma: Float = Field(0, ge=0, le=1)  # gray levels^g, g drawn log-uniformly in [1 / (1 + gamma), 1 + gamma]
    sharpness: Float = Field(0, ge=0, le=0.5)  # Keras' RandomSharpness factor in [0.5 - s, 0.5 + s]: blur to sharpen
    noise: Float = Field(0, ge=0, lt=1)  # Gaussian noise, its standard deviation this share of the gray range
    # > 0: Keras' RandAugment, this many operations a batch drawn from its eleven (shear, rotation, solarization,
    # equalization, ...), at its default magnitude; on top of the above
    rand_augment: StrictInt = Field(0, ge=0, le=11)

    @model_validator(mode="after")
    def _one_way_of_mixing(self) -> "AugmentConfig":
        if self.mixup and self.cutmix:
            raise ValueError(f"train.augment.mixup = {self.mixup} with train.augment.cutmix = {self.cutmix}: each "
                             "mixes the pairs its own way; set one of them to 0")
        return self


class TrainConfig(Section):
    epochs: StrictInt = Field(30, ge=1)
    batch_size: StrictInt = Field(32, ge=1)
    learning_rate: Float = Field(1e-3, gt=0)
    # per stage (warm-up, the rest); cosine_restarts: SGDR, cosine cycles each twice the last, ending with the stage
    lr_schedule: Literal["exponential", "cosine", "cosine_restarts", "plateau"] = "cosine"
    lr_restarts: StrictInt = Field(1, ge=1)  # cosine_restarts: restarts a stage (1: a third of it, then the rest)
    lr_decay_rate: Float = Field(0.9, gt=0, le=1)  # exponential: the learning rate x this per epoch
    lr_plateau_factor: Float = Field(0.5, gt=0, lt=1)  # plateau: x this when `monitor` stalls ...
    lr_plateau_patience: StrictInt = Field(2, ge=1)  # ... for this many epochs
    fine_tune: Literal["frozen", "partial", "full"] = "full"  # which backbone layers train
    fine_tune_layers: StrictInt = Field(30, ge=1)  # partial: the last this many layers of the backbone
    warmup_epochs: StrictInt = Field(0, ge=0)  # first train the head alone this many epochs (0: no warm-up)
    fine_tune_learning_rate: Float = Field(1e-5, gt=0)  # after the warm-up
    augment: AugmentConfig = AugmentConfig()
    # weights: balanced class weights in the loss; oversample: batches drawn from both classes alike (the rarer
    # class seen more often, each time augmented anew), loss unweighted; none: neither
    class_balance: Literal["weights", "oversample", "none"] = "weights"
    label_smoothing: Float = Field(0, ge=0, lt=0.5)  # targets 0/1 become s/2 and 1 - s/2
    # decoupled weight decay (AdamW): each step, every kernel x (1 - learning rate x this); biases and
    # normalisation parameters are not decayed
    weight_decay: Float = Field(0, ge=0, lt=1)
    # ema: validation, the checkpoint and early stopping see an exponential moving average of the weights
    # (Polyak averaging, the optimizer's own), updated each step with this momentum
    weight_averaging: Literal["none", "ema"] = "ema"
    # auto: 0.99, or 1 - 1/(steps an epoch) when an epoch is shorter than 100 steps (pneumonia.training.fit)
    ema_momentum: Literal["auto"] | Annotated[Float, Field(gt=0, lt=1)] = "auto"
    early_stopping_patience: StrictInt = Field(8, ge=1)
    # The kept model's epoch is this one or a later one (the last, if train.epochs is fewer): the checkpoint and
    # early stopping ignore the epochs before it (1: every epoch). Early epochs win by chance on a small validation
    # split (the compact sample's seed 42 kept its epoch 7 of 15: docs/results.md)
    min_epochs: StrictInt = Field(15, ge=1)
    monitor: Literal["val_auc", "val_loss"] = "val_auc"
    seed: Seed = 42
    # N > 1: N members, member k trained as the whole training with seed + k; the model is the mean of their
    # outputs (models.build.ensemble_of). N x the training time and N x the prediction time
    ensemble_members: StrictInt = Field(1, ge=1, le=MAX_ENSEMBLE_MEMBERS)
    # Knowledge distillation: N > 0 first trains N teachers, teacher k the whole training with seed + k, then the
    # model (seed train.seed) on targets (1 - w) x label + w x the teachers' mean probability of the un-augmented
    # image, w = distillation_weight. One model's size and prediction cost; (N + 1) x the training time
    distillation_teachers: StrictInt = Field(0, ge=0, le=MAX_ENSEMBLE_MEMBERS)
    distillation_weight: Float = Field(0.5, gt=0, le=1)
    deterministic: StrictBool = True  # deterministic ops, no Grappler rewrites: same seed, same model (slower on GPUs)
    # Where and how (pneumonia.distribute): batch_size is per replica, the global batch is x replicas.
    accelerator: Literal["auto", "cpu", "gpu", "tpu"] = "auto"
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    scale_learning_rate: StrictBool = False  # learning rates x the replica count (linear scaling rule)
    steps_per_execution: StrictInt = Field(1, ge=1)  # batches per compiled call (TPUs: e.g. 32)
    # "": the backup of an unfinished training is backup/train/<worker>. A URI tf.io.gfile writes to
    # (gs://bucket/path): under <uri>/<fingerprint>/<worker>/, which outlives a preempted VM's disk.
    backup_uri: str = ""

    @property
    def first_kept_epoch(self) -> int:
        """0-based: the first epoch the checkpoint and early stopping consider (train.min_epochs, or the last)."""
        return min(self.min_epochs, self.epochs) - 1

    @field_validator("backup_uri", mode="before")
    @classmethod
    def _backup_uri_with_scheme(cls, uri: Any) -> Any:
        return storage_uri(uri, "train.backup_uri", "gs://bucket/pneumonia/backups", "for the local backup/train")

    @model_validator(mode="after")
    def _warmup_fits_strategy(self) -> "TrainConfig":
        if self.warmup_epochs and self.fine_tune == "frozen":
            raise ValueError(
                f"train.warmup_epochs = {self.warmup_epochs} with train.fine_tune = 'frozen': the warm-up trains "
                "the head on a frozen backbone, then unfreezes it per train.fine_tune; use 'partial' or 'full', "
                "or set train.warmup_epochs to 0"
            )
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs = {self.warmup_epochs} leaves no fine-tuning epoch of train.epochs = "
                f"{self.epochs}; lower it below train.epochs"
            )
        return self

    @model_validator(mode="after")
    def _member_seeds_in_range(self) -> "TrainConfig":
        for name, trained, last_offset in (("ensemble_members", "member", self.ensemble_members - 1),
                                           ("distillation_teachers", "teacher", self.distillation_teachers)):
            if self.seed + last_offset > MAX_SEED:
                raise ValueError(
                    f"train.{name} = {getattr(self, name)} with train.seed = {self.seed}: {trained} k trains "
                    f"with seed train.seed + k, which passes {MAX_SEED} (2**32 - 1, the largest seed NumPy takes); "
                    "lower train.seed"
                )
        return self

    @model_validator(mode="after")
    def _distillation_alone(self) -> "TrainConfig":
        if not self.distillation_teachers:
            return self
        if self.ensemble_members > 1:
            raise ValueError(
                f"train.distillation_teachers = {self.distillation_teachers} with train.ensemble_members = "
                f"{self.ensemble_members}: distillation trains one model from an ensemble of teachers; set one of "
                "them (train.ensemble_members to 1, or train.distillation_teachers to 0)"
            )
        for name in ("mixup", "cutmix"):
            if getattr(self.augment, name):
                raise ValueError(
                    f"train.distillation_teachers = {self.distillation_teachers} with train.augment.{name} = "
                    f"{getattr(self.augment, name)}: both replace the labels (the teachers' probabilities, mixed "
                    "pairs); set one of them to 0"
                )
        return self


class EvaluateConfig(Section):
    threshold: float | str = "sensitivity@0.93"  # chosen on validation: a number, "youden" or "sensitivity@X"
    bootstrap_samples: StrictInt = Field(1000, ge=100)  # resamples for the 95% confidence intervals
    images_per_outcome: StrictInt = Field(4, ge=1, le=12)  # test images per outcome (TP, TN, FP, FN) shown
    seed: Seed = 42  # bootstrap resampling and the choice of images shown
    # Test-time augmentation: each probability the mean over this many fixed views of the image
    # (models.augmentation.TEST_TIME_VIEWS), in evaluate, `pneumonia predict` and the served model alike
    tta_views: Literal[1, 3, 9] = 1
    # A DICOM header outside the intended use (not the chest, not frontal, patient age outside 0-5 years):
    # flag the prediction, refuse the image, or ignore the header; in predict, serving and the external set
    input_checks: Literal["flag", "refuse", "ignore"] = "flag"
    # Share of validation images the out-of-distribution flag may raise: its threshold (pneumonia.ood)
    ood_flagged: float = Field(0.01, gt=0, lt=0.5)
    # The probability fitted to the validation labels (pneumonia.evaluation.calibration), in evaluate, predict and
    # serving alike; the threshold is chosen on it. none | temperature | platt
    calibration: Literal["none", "temperature", "platt"] = "none"
    # Images of another site ({NORMAL,PNEUMONIA}/ folders, a zip or a folder) scored at the chosen
    # threshold: external validity. "" = none. Never trained, early-stopped or checkpointed on.
    external: str = ""

    @field_validator("threshold", mode="before")
    @classmethod
    def _known_rule(cls, rule: Any) -> float | str:
        return parse_threshold_rule(rule)

    @field_validator("tta_views", mode="before")
    @classmethod
    def _an_integer(cls, views: Any) -> Any:
        # As strict as the other ints: a Literal alone took `true` for 1 and 3.0 for 3
        if isinstance(views, bool) or not isinstance(views, int):
            raise ValueError("Input should be a valid integer: 1, 3 or 9")
        return views


class TrackingConfig(Section):
    experiment: str = Field("pneumonia", min_length=1, max_length=MLFLOW_NAME_LENGTH)
    # Registered-model name for each evaluated model (alias "candidate"); None: not registered.
    register_model: str | None = Field(None, max_length=MLFLOW_NAME_LENGTH)

    @field_validator("register_model")
    @classmethod
    def _no_blank_name(cls, name: str | None) -> str | None:
        return (name or "").strip() or None


class Params(Section):
    data: DataConfig = DataConfig()
    tfrecords: TFRecordsConfig = TFRecordsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto(cls, raw: Any) -> Any:
        return resolve_auto(raw)

    @model_validator(mode="after")
    def _image_fits_model(self) -> "Params":
        smallest = min_image_size(self.model.name)
        seen = self.model.cropped_size(self.data.image_size)
        if seen < smallest:
            size = f"data.image_size = {self.data.image_size}"
            raise ValueError(
                f"{size} is below the {smallest}px minimum of model {self.model.name!r}; raise data.image_size"
                if seen == self.data.image_size else
                f"{size} less model.crop = {self.model.crop} on each side leaves {seen} px, below the {smallest}px "
                f"minimum of model {self.model.name!r}; raise data.image_size or lower model.crop"
            )
        return self

    @model_validator(mode="after")
    def _strategy_fits_model(self) -> "Params":
        # Freezing only makes sense for pretrained layers; a network trained from scratch trains whole.
        train = self.train
        if self.model.weights == "none" and (train.fine_tune != "full" or train.warmup_epochs):
            what = "custom_cnn has no pretrained backbone" if self.model.name == CUSTOM_CNN else \
                f"model.weights = 'none' trains {self.model.name} from scratch"
            raise ValueError(
                f"train.fine_tune = {train.fine_tune!r}, train.warmup_epochs = {train.warmup_epochs}: {what}, "
                "so nothing can be frozen; set train.fine_tune to 'full' and train.warmup_epochs to 0"
                + ("" if self.model.name == CUSTOM_CNN else ", or use model.weights: imagenet or a weights file")
            )
        return self


# What an error message quotes of a value: a few items and characters, however large the value.
_QUOTED = reprlib.Repr()
_QUOTED.maxlevel, _QUOTED.maxlist, _QUOTED.maxdict, _QUOTED.maxstring, _QUOTED.maxother = 3, 6, 6, 80, 80
# params.yaml is a few KB; past these it is a mistake or an attack (a "billion laughs" of nested aliases:
# 1 KB that expands to 10**9 values), refused before it is expanded.
MAX_PARAMS_BYTES = 1_000_000
MAX_PARAMS_VALUES = 100_000


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling against params.yaml in the repository)"
    if error["input"] is None and error["type"] == "model_type":
        return (f"{key}: the section is empty (its name with nothing under it): give its keys as in params.yaml in "
                "the repository, or delete the line for its defaults")
    if not error["loc"] or isinstance(error["input"], dict):
        return message  # a check across keys: its message names them
    return f"{key} = {_QUOTED.repr(error['input'])}: {message}"


def parse_params(raw: dict[str, Any], source: str = str(paths.PARAMS)) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(error)}" for error in exc.errors())
        raise PipelineError(f"{source} has invalid params:\n{problems}") from None


def with_overrides(raw: Any, overrides: Mapping[str, Any]) -> Any:
    """`raw` params with each dotted key of `overrides` (`train.epochs`, as `dvc exp run -S` names them)
    set to its value; a string value is read as YAML, as DVC reads an -S value (`1e-4`, `true`)."""
    result = copy.deepcopy(raw)
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = result
        for depth, section in enumerate(sections):
            if not isinstance(node, dict) or not isinstance(node.setdefault(section, {}), dict):
                raise PipelineError(f"{key} = {value!r}: {'.'.join(sections[:depth + 1])} is not a section of "
                                    "params.yaml; name a key as params.yaml nests it, e.g. train.epochs")
            node = node[section]
        node[name] = _yaml_value(value) if isinstance(value, str) else value
    return result


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not YAML: the string itself, for the validation to judge


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        super().__init__(f"the key {key!r} twice (the second on line {line})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in a mapping (PyYAML keeps the last; DVC refuses the file)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_values(node: yaml.Node) -> int:
    """How many values the YAML document `node` holds once its aliases are expanded, without expanding
    them (an alias is the node it names, counted once per use); a recursive alias counts as too many."""
    counted: dict[int, int] = {}

    def count(node: yaml.Node, open_nodes: frozenset[int]) -> int:
        if id(node) in open_nodes:
            return MAX_PARAMS_VALUES + 1
        if id(node) not in counted:
            children = node.value if isinstance(node, yaml.SequenceNode) else (
                [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else [])
            counted[id(node)] = 1 + sum(count(child, open_nodes | {id(node)}) for child in children)
        return counted[id(node)]

    return count(node, frozenset())


def read_params_file(path: Path) -> Any:
    """The YAML of a params file, as DVC reads it (UTF-8, no key twice in a mapping); refused when larger
    than MAX_PARAMS_BYTES or when its aliases expand past MAX_PARAMS_VALUES values."""
    try:
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:
            raise PipelineError(f"{path} is {size / 1e6:.1f} MB: more than the {MAX_PARAMS_BYTES / 1e6:.0f} MB a "
                                "params file may have (params.yaml is a few KB). Check that it is the right file.")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the stage from the repository root") from None
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                            "save it as UTF-8") from None
    loader = _UniqueKeyLoader(text)  # a SafeLoader subclass
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_values(node) > MAX_PARAMS_VALUES:
            raise PipelineError(f"{path} expands its aliases to more than {MAX_PARAMS_VALUES:,} values (nested or "
                                "recursive YAML aliases, `*name`): write the values out instead.")
        return loader.construct_document(node) if node is not None else None
    except _DuplicateKey as exc:
        raise PipelineError(f"{path} has {exc}: keep one (DVC refuses such a file too)") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path} is not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def load_params(path: Path = paths.PARAMS, overrides: Mapping[str, Any] | None = None) -> Params:
    """params.yaml, validated; with `overrides` (dotted keys, see `with_overrides`) applied first."""
    return parse_params(with_overrides(read_params_file(path) or {}, overrides or {}), str(path))


def flatten(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """params (or a section, its keys after `prefix`) as {'data.image_size': 160, ...}, e.g. for MLflow."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = value

    walk(prefix, config.model_dump())
    return flat
