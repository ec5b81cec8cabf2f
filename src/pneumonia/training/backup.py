"""The backup of an unfinished training: what a new process with the same params and data resumes from
after a preemption.

One folder per worker holds the params fingerprint, the per-epoch history, the best checkpoint, the
MLflow run id (the chief's) and Keras's BackupAndRestore state of each stage; an ensemble's
(train.ensemble_members), a folder of this kind per member, and the result of each member finished.
`TrainingBackup` names every one of them. The folder is a local path or a URI (train.backup_uri: a bucket outlives a
preempted VM's disk), so every read and write goes through tf.io.gfile, and Keras's own through its
file_utils, which hands URIs to tf.io.gfile too.
"""

import hashlib
import io
import json
import logging
import os
import tempfile
import uuid
import zipfile
from pathlib import Path

import keras
import tensorflow as tf

from pneumonia.atomic import atomic_path
from pneumonia.config import ModelConfig, TrainConfig, flatten
from pneumonia.data.tfrecords import read_meta
from pneumonia.errors import PipelineError
from pneumonia.models.build import load_model
from pneumonia.paths import join

log = logging.getLogger(__name__)


def read_file(path: str) -> str | None:
    """The text of a file in a backup (a local path or a URI), None when there is none."""
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as file:
        return file.read()


def write_file(path: str, text: str) -> None:
    """Replace a file in a backup whole: written beside it, then renamed over it, so a process killed
    meanwhile leaves the previous version (a stray `.tmp-*` at worst, removed with the backup)."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with tf.io.gfile.GFile(temporary, "w") as file:
        file.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def complete_keras_file(path: str) -> bool:
    """Whether a .keras file (a zip) is whole: every member present and matching its CRC."""
    try:
        with tf.io.gfile.GFile(path, "rb") as file, zipfile.ZipFile(file) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, EOFError, OSError, tf.errors.OpError):
        return False


def stable_keras_bytes(data: bytes) -> bytes:
    """The .keras file `data` (a zip) with bytes that depend on the model alone: Keras writes the save
    time (metadata.json's date_saved, the members' timestamps) and memory addresses (config.json's
    shared_object_id), so the same trained model was a different models/model.keras, to DVC too, each
    time. Shared-object ids are renumbered in order of appearance: loading matches them only to each other."""
    renumbered: dict[int, int] = {}

    def renumber(value):
        if isinstance(value, dict):
            return {key: renumbered.setdefault(inner, len(renumbered)) if key == "shared_object_id"
                    else renumber(inner) for key, inner in value.items()}
        return [renumber(inner) for inner in value] if isinstance(value, list) else value

    stable = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as saved, zipfile.ZipFile(stable, "w") as written:
        for info in saved.infolist():
            content = saved.read(info)
            if info.filename == "metadata.json":
                content = json.dumps({k: v for k, v in json.loads(content).items() if k != "date_saved"}).encode()
            elif info.filename == "config.json":
                content = json.dumps(renumber(json.loads(content))).encode()
            member = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))  # the earliest a zip records
            member.compress_type, member.external_attr = info.compress_type, info.external_attr
            written.writestr(member, content)
    return stable.getvalue()


def write_stable(data: bytes, model_path: Path) -> None:
    """The .keras file `data` written to `model_path` atomically, its bytes made stable (stable_keras_bytes)."""
    with atomic_path(model_path) as saved:
        saved.write_bytes(stable_keras_bytes(data))


def save_stable(model: keras.Model, model_path: Path) -> None:
    """`model` saved to `model_path` as `write_stable` writes a file."""
    with tempfile.TemporaryDirectory(prefix="pneumonia-model-") as scratch:
        saved = Path(scratch) / model_path.name
        keras.saving.save_model(model, saved)
        write_stable(saved.read_bytes(), model_path)


class EpochHistory(keras.callbacks.Callback):
    """Every finished epoch's metrics, kept in the backup folder so that a resumed run has them all.

    Runs before the backup of the epoch: an epoch recorded here but not backed up is forgotten when
    the next fit starts again from the backup (`on_epoch_begin`), and trained again.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        recorded = read_file(path)
        self.epochs: list[dict] = json.loads(recorded) if recorded is not None else []  # {"epoch", "stage", metrics}
        self.stage = ""
        self._fit_started = False

    def start_stage(self, name: str) -> int:
        """Begin a stage; the epochs of the stages before it (fit's initial_epoch)."""
        self.stage, self._fit_started = name, False
        earlier = []
        for record in self.epochs:
            if record["stage"] == name:
                break
            earlier.append(record)
        return len(earlier)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._fit_started:  # the first epoch of this fit: anything from here on is trained again
            self._fit_started = True
            self.epochs = [record for record in self.epochs if record["epoch"] < epoch]

    def on_epoch_end(self, epoch, logs=None):
        metrics = {name: float(value) for name, value in (logs or {}).items()}
        self.epochs.append({"epoch": epoch, "stage": self.stage, **metrics})
        write_file(self.path, json.dumps(self.epochs, indent=2, sort_keys=True) + "\n")

    def as_lists(self) -> dict[str, list[float]]:
        names = dict.fromkeys(name for record in self.epochs for name in record if name not in ("epoch", "stage"))
        return {name: [record.get(name, float("nan")) for record in self.epochs] for name in names}


class StageBackup(keras.callbacks.BackupAndRestore):
    """Keras BackupAndRestore for one stage, kept until the whole training has finished."""

    def __init__(self, backup_dir: str, end_epoch: int):
        super().__init__(backup_dir, double_checkpoint=True, delete_checkpoint=False)
        self.end_epoch = end_epoch

    def on_train_end(self, logs=None):
        # A finished stage, also one that early stopping ended, is backed up as complete with its
        # final weights: a resumed run goes on with the next stage instead of training this one on.
        self._current_epoch = self.end_epoch
        self._save_model()
        # Keras leaves the restored epoch on the model (model._initial_epoch), where the next
        # stage's fit would take it as its own starting epoch.
        self.model._initial_epoch = None


class TrainingBackup:
    """One worker's backup folder (a local path or a URI) and every file in it."""

    FINGERPRINT = "fingerprint"  # what the backup is valid for (`fingerprint`)
    HISTORY = "history.json"  # EpochHistory
    CHECKPOINT = "best.keras"  # the best epoch so far, promoted to the model when training ends
    RUN_ID = "mlflow_run_id"  # the chief's: the MLflow run a resumed training logs into
    STAGE = "stage-{number}"  # Keras's BackupAndRestore state of each stage (StageBackup)
    MEMBER = "member-{number}"  # an ensemble's member: a backup of its own (`member`)
    RESULT = "result.json"  # a finished member's result: a resumed ensemble does not train it again

    def __init__(self, folder: str | os.PathLike, fingerprint: str = "", made_in: tuple[str, ...] = ()):
        self.folder = os.fspath(folder)
        self.fingerprint = fingerprint
        # the folders around it that open() makes and remove() removes once empty, innermost first
        self.made_in = made_in
        self._history: EpochHistory | None = None

    @staticmethod
    def fingerprint_of(model: ModelConfig, train: TrainConfig, tfrecords: Path, tracking_uri: str) -> str:
        """What a backup is valid for: the same model and training params, the same TFRecords and the
        same MLflow store (the run it logs into). A hash: the tracking URI may hold a password, and the
        marker may be in a bucket."""
        trained_on = {**flatten(model, "model"), **flatten(train, "train")}
        identity = [trained_on, read_meta(tfrecords), tracking_uri]
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    @classmethod
    def of_worker(cls, local_root: Path, backup_uri: str, worker: str, fingerprint: str) -> "TrainingBackup":
        """This worker's backup: `local_root`/<worker>, or with train.backup_uri
        <uri>/<fingerprint[:16]>/<worker>. Each experiment gets a folder of its own under a URI: queued
        experiments (each in a temporary copy of the repository, with a local backup of its own) or
        several machines share the bucket, and one must neither remove nor resume another's backup."""
        if not backup_uri:  # backup/train/<worker>: backup/train/ and backup/ go with the last worker's backup
            return cls(local_root / worker, fingerprint, tuple(os.fspath(folder) for folder in
                                                               (local_root, *local_root.parents) if folder.name))
        experiment = join(backup_uri, fingerprint[:16])
        return cls(join(experiment, worker), fingerprint, (experiment,))

    def path(self, name: str) -> str:
        return join(self.folder, name)

    def open(self) -> bool:
        """Make the folder the backup of this training; True when it holds an interrupted run to resume.
        A backup of other params or data is removed: it must not be resumed."""
        marker = self.path(self.FINGERPRINT)
        try:
            recorded = read_file(marker)
            if recorded != self.fingerprint and tf.io.gfile.isdir(self.folder):
                log.info("removing the backup %s of a training with other params or data", self.folder)
                tf.io.gfile.rmtree(self.folder)
            tf.io.gfile.makedirs(self.folder)
            write_file(marker, self.fingerprint)
        except tf.errors.OpError as exc:  # before any training, not after its first epoch
            raise PipelineError(
                f"cannot keep the training backup in {self.folder} ({exc.message}).\nWith train.backup_uri set, "
                "check that the bucket exists and that this machine's credentials may write to it (gs://: `gcloud "
                "auth application-default login` or GOOGLE_APPLICATION_CREDENTIALS), or leave train.backup_uri "
                "empty for a local backup."
            ) from None
        return recorded == self.fingerprint

    @property
    def history(self) -> EpochHistory:
        """The per-epoch history, as recorded so far (one callback per backup)."""
        if self._history is None:
            self._history = EpochHistory(self.path(self.HISTORY))
        return self._history

    @property
    def checkpoint(self) -> str:
        return self.path(self.CHECKPOINT)

    def stage(self, number: int, end_epoch: int) -> StageBackup:
        """The BackupAndRestore callback of stage `number` (1-based), whose last epoch is `end_epoch`."""
        return StageBackup(self.path(self.STAGE.format(number=number)), end_epoch)

    def run_id(self) -> str | None:
        return read_file(self.path(self.RUN_ID))

    def keep_run_id(self, run_id: str) -> None:
        write_file(self.path(self.RUN_ID), run_id)

    def check_checkpoint(self, model_path: Path) -> None:
        """A PipelineError unless the best checkpoint is whole (it is to become `model_path`)."""
        if not complete_keras_file(self.checkpoint):
            raise PipelineError(
                f"the best model {self.checkpoint} is damaged (truncated: a process was killed while saving it, "
                f"before saves were atomic); nothing was promoted to {model_path}. Remove the backup folder "
                f"{self.folder} and train again."
            )

    def promote(self, model_path: Path) -> None:
        """Save the best checkpoint's model to `model_path` (atomically, its bytes made stable: save_stable),
        once it is known to be whole, without what only training reads: the optimizer's state (Adam's moments
        and the weights' average, three quarters of a custom_cnn file) and the compile settings."""
        self.check_checkpoint(model_path)
        save_stable(load_model(self.checkpoint, compile=False), model_path)

    def member(self, number: int) -> "TrainingBackup":
        """The backup of ensemble member `number` (0-based, train.ensemble_members): a training of its own in
        a folder of this one, so a resumed ensemble resumes the member it was training and keeps those done."""
        member = TrainingBackup(self.path(self.MEMBER.format(number=number)))
        tf.io.gfile.makedirs(member.folder)
        return member

    def finished_result(self) -> str | None:
        """What `keep_finished_result` kept: the training in this backup has finished; None until then."""
        return read_file(self.path(self.RESULT))

    def keep_finished_result(self, text: str) -> None:
        write_file(self.path(self.RESULT), text)

    def remove(self) -> None:
        """Remove a finished training's backup, and the folders around it (`made_in`) once no worker's
        backup is left in them: backup/train/ and backup/ locally, the fingerprint's folder under
        train.backup_uri."""
        tf.io.gfile.rmtree(self.folder)
        for folder in self.made_in:
            try:
                if tf.io.gfile.listdir(folder):
                    return  # another worker's backup is still there
                tf.io.gfile.rmtree(folder)
            except tf.errors.NotFoundError:
                pass  # another worker removed it first
