"""The train stage's training: where it runs (pneumonia.distribute), resumed from its backup after a
kill (`backup.TrainingBackup`), in its MLflow run on the chief.

Every worker of a TF_CONFIG cluster runs the stage; each trains in a backup of its own, and only the
chief opens the MLflow run and gets the result to write. A killed training started again with the
same params and data resumes from its backup and logs into the same MLflow run, whose id the backup
keeps. The backup is removed once the caller has written the outputs.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pneumonia import distribute, tracking
from pneumonia.config import Params, flatten
from pneumonia.data.class_weights import read_class_weights
from pneumonia.training.backup import TrainingBackup
from pneumonia.training.fit import TrainingResult, train


@contextmanager
def resumable_training(params: Params, tfrecords: Path, class_weights: Path, model_path: Path, backup_root: Path,
                       manifests: Path) -> Iterator[TrainingResult | None]:
    """Train (or resume) the model of `params` on `tfrecords` with the weights in `class_weights`, saving it to
    `model_path`; the backup under `backup_root` (or train.backup_uri). On the chief, inside its MLflow run
    (tagged with `manifests`' hash), yields the result: the caller writes the outputs and records them in the
    run; on another worker, yields None. The backup is removed when the block ends without an error."""
    # First: a multi-worker strategy must exist before TensorFlow does anything else.
    placement = distribute.place(params.train.accelerator, params.train.precision, params.model.backbone)
    class_weight = read_class_weights(class_weights)
    fingerprint = TrainingBackup.fingerprint_of(params.model, params.train, tfrecords, tracking.tracking_uri())
    backup = TrainingBackup.of_worker(backup_root, params.train.backup_uri, placement.worker_name, fingerprint)
    resuming = backup.open()
    if not placement.is_chief:
        train(params.model, params.train, tfrecords, class_weight, model_path, placement, backup)
        yield None
    else:
        # Tagged with where it trains: a resumed run may continue on other hardware.
        with tracking.training_run(params.tracking, flatten(params), manifests, backup.run_id() if resuming else None,
                                   tags=placement.describe()):
            backup.keep_run_id(tracking.active_run_id())
            yield train(params.model, params.train, tfrecords, class_weight, model_path, placement, backup)
    backup.remove()  # finished: the next training starts afresh
