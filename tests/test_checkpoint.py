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
from pneumonia.training.callbacks import make_callbacks
checkpoint = sys.argv[1]
model = keras.Sequential([keras.Input((4000,)), keras.layers.Dense(4000), keras.layers.Dense(1)])
callback = make_callbacks(TrainConfig(), checkpoint)[0]
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
