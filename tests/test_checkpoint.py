"""The best checkpoint is never a truncated file: a process SIGKILLed while saving it leaves the
previous best model, and a damaged one (left by older code) is refused, not promoted."""

import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import tool_env

# Saves the best model again and again, as ModelCheckpoint does each improving epoch: a model of
# ~64 MB, so that a save takes long enough to be killed in.
SAVER = """
import sys
import keras
from pneumonia.config import TrainConfig
from pneumonia.training.callbacks import AtomicModelCheckpoint, make_callbacks
checkpoint = sys.argv[1]
model = keras.Sequential([keras.Input((4000,)), keras.layers.Dense(4000), keras.layers.Dense(1)])
[callback] = [c for c in make_callbacks(TrainConfig(min_epochs=1), checkpoint) if isinstance(c, AtomicModelCheckpoint)]
callback.set_model(model)
epoch = 0
while True:
    callback.on_epoch_end(epoch, {"val_auc": epoch / 1e6})
    epoch += 1
    print("saved", epoch, flush=True)
"""


@pytest.mark.slow
def test_a_save_killed_midway_leaves_a_whole_checkpoint(tmp_path):
    from pneumonia.training.backup import complete_keras_file

    checkpoint = tmp_path / "backup" / "best.keras"
    for kill in range(4):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(checkpoint)], env=tool_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert saver.stdout.readline().startswith("saved"), "the saver did not start"
            time.sleep(0.3 + 0.4 * kill)  # at a different point of a save each time
        finally:
            saver.send_signal(signal.SIGKILL)
            saver.wait(timeout=30)
        assert complete_keras_file(str(checkpoint)), f"kill {kill + 1} left a damaged {checkpoint.name}"
    import keras

    assert keras.models.load_model(checkpoint).count_params() == 4000 * 4000 + 4000 + 4001
    # The killed saves' temporaries are what remains besides it, and the backup is removed as a whole.
    assert {path.name for path in checkpoint.parent.iterdir()} - {checkpoint.name} <= {
        path.name for path in checkpoint.parent.glob(".*.tmp-best.keras")}


def test_a_truncated_best_checkpoint_is_refused_not_promoted(tmp_path):
    import keras

    from pneumonia.errors import PipelineError
    from pneumonia.training.backup import TrainingBackup, complete_keras_file

    whole, truncated = TrainingBackup(tmp_path / "whole"), TrainingBackup(tmp_path / "truncated")
    Path(whole.folder).mkdir()
    keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)]).save(whole.checkpoint)
    Path(truncated.folder).mkdir()
    saved = Path(whole.checkpoint).read_bytes()
    Path(truncated.checkpoint).write_bytes(saved[: len(saved) // 2])
    assert complete_keras_file(whole.checkpoint) and not complete_keras_file(truncated.checkpoint)
    model = tmp_path / "models" / "model.keras"
    with pytest.raises(PipelineError, match=r"truncated/best.keras is damaged .* nothing was promoted"):
        truncated.promote(model)
    assert not model.exists()
    whole.promote(model)
    assert zipfile.ZipFile(model).testzip() is None


def test_the_promoted_model_holds_no_optimizer_state_and_predicts_as_the_checkpoint(tmp_path):
    """models/model.keras is for predicting: the best checkpoint of a training holds Adam's moments and the
    weights' average too (three quarters of a custom_cnn file); the promoted file holds the network alone."""
    import io

    import h5py
    import keras
    import numpy as np

    from pneumonia.training.backup import TrainingBackup

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(use_ema=True), loss="binary_crossentropy")
    inputs = np.random.default_rng(0).normal(size=(16, 8))
    model.fit(inputs, np.ones((16, 1)), verbose=0)
    backup = TrainingBackup(tmp_path / "backup")
    Path(backup.folder).mkdir()
    model.save(backup.checkpoint)
    promoted = tmp_path / "models" / "model.keras"
    backup.promote(promoted)

    def weight_groups(path) -> set[str]:
        with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
            return set(weights)

    assert "optimizer" in weight_groups(backup.checkpoint) and "optimizer" not in weight_groups(promoted)
    assert promoted.stat().st_size < Path(backup.checkpoint).stat().st_size
    np.testing.assert_array_equal(keras.saving.load_model(promoted).predict(inputs, verbose=0),
                                  model.predict(inputs, verbose=0))


# The same model (seeded, with a layer used twice: a shared object in its config) saved as the best
# checkpoint and promoted to the model file, as a training does; then its prediction on fixed input.
PROMOTED = """
import sys
from pathlib import Path
import keras
import numpy as np
from pneumonia.training.backup import TrainingBackup
keras.utils.set_random_seed(0)
inputs = keras.Input((4,))
shared = keras.layers.Dense(4)
model = keras.Model(inputs, keras.layers.Dense(1)(shared(shared(inputs))))
backup = TrainingBackup(sys.argv[1])
Path(sys.argv[1]).mkdir()
model.save(backup.checkpoint)
backup.promote(Path(sys.argv[2]))
print(keras.saving.load_model(sys.argv[2]).predict(np.ones((1, 4)), verbose=0)[0, 0])
"""


@pytest.mark.slow
def test_the_same_model_gives_the_same_model_file_in_another_process(tmp_path):
    """models/model.keras is a DVC output: Keras writes the save time and memory addresses into it (metadata's
    date_saved, the weights member's timestamp, config's shared_object_id), so the same trained model never
    had the same hash; the promoted file keeps neither, and loads to the same model."""
    from conftest import run

    outputs = []
    for name in ("first", "again"):
        outputs.append(run([sys.executable, "-c", PROMOTED, str(tmp_path / f"backup-{name}"),
                            str(tmp_path / f"{name}.keras")], tmp_path).stdout)
        time.sleep(2.1)  # past the 2 s resolution of a zip's timestamps
    assert (tmp_path / "first.keras").read_bytes() == (tmp_path / "again.keras").read_bytes()
    assert outputs[0] == outputs[1] and outputs[0].strip()
