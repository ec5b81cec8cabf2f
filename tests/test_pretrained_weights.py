"""ImageNet weights through Keras's real download path (keras.utils.get_file over HTTP), served by
a local server in place of Keras's storage; and the error when they cannot be fetched."""

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import h5py
import keras
import numpy as np
import pytest

from pneumonia.architectures import BACKBONES
from pneumonia.config import ModelConfig
from pneumonia.errors import PipelineError
from pneumonia.models.build import build_model
from pneumonia.models.fine_tuning import backbone_of

SIZE = 96  # MobileNetV2 has ImageNet weights for 96 px: the file name Keras asks for names that size


class WeightsServer:
    """Serves a folder over HTTP on 127.0.0.1 and records the paths asked for."""

    def __init__(self, folder):
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_imagenet_style_file(path):
    """A no-top MobileNetV2 (alpha 1.0) weights file in the legacy HDF5 layout of Keras's published
    ImageNet files, randomly initialised: the real shape, not the real values."""
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    keras.utils.set_random_seed(7)
    network = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    with h5py.File(path, "w") as file:
        save_weights_to_hdf5_group(file, network)
    return network.get_weights()


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """An empty Keras cache, so the weights must be downloaded."""
    from keras.src.backend import config

    home = tmp_path / "keras-home"
    home.mkdir()  # get_file falls back to /tmp/.keras when the folder is not writable (or not there)
    monkeypatch.setattr(config, "_KERAS_DIR", str(home))  # what get_file reads (set from KERAS_HOME at import)
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


@pytest.mark.slow
def test_imagenet_weights_download_through_keras_from_a_local_server(tmp_path, keras_home, monkeypatch):
    from keras.src.applications import mobilenet_v2

    file_name = BACKBONES["mobilenetv2"].imagenet_file_name(SIZE)
    storage = tmp_path / "storage"
    storage.mkdir()
    served = write_imagenet_style_file(storage / file_name)
    with WeightsServer(storage) as server:
        # Keras builds the URL as BASE_WEIGHT_PATH + file name (keras/src/applications/mobilenet_v2.py)
        monkeypatch.setattr(mobilenet_v2, "BASE_WEIGHT_PATH", server.url)
        model = build_model(ModelConfig(crop=0, name="mobilenetv2", weights="imagenet", head_units=8), SIZE)
    assert server.requests == [f"/{file_name}"]
    assert (keras_home / "models" / file_name).is_file()  # cached where the error message says
    loaded = backbone_of(model).get_weights()
    assert len(loaded) == len(served) > 100
    for mine, theirs in zip(loaded, served):
        np.testing.assert_array_equal(mine, theirs)

    # Cached: a second model loads them without asking the server (which is gone).
    again = build_model(ModelConfig(crop=0, name="mobilenetv2", weights="imagenet", head_units=8), SIZE)
    np.testing.assert_array_equal(backbone_of(again).get_weights()[0], served[0])


def test_weights_that_cannot_be_fetched_say_what_to_do_and_a_file_path_works_offline(tmp_path, keras_home,
                                                                                       monkeypatch):
    from keras.src.applications import mobilenet_v2

    file_name = BACKBONES["mobilenetv2"].imagenet_file_name(SIZE)
    with WeightsServer(tmp_path) as server:  # up, but without the file: HTTP 404
        monkeypatch.setattr(mobilenet_v2, "BASE_WEIGHT_PATH", server.url)
        with pytest.raises(PipelineError) as error:
            build_model(ModelConfig(crop=0, name="mobilenetv2", weights="imagenet"), SIZE)
    message = str(error.value)
    assert str(keras_home / "models" / file_name) in message  # where to put the file
    assert "model.weights" in message and "path" in message  # or point model.weights at it
    assert f"{server.url}{file_name}" in message  # where it was looked for
    assert not (keras_home / "models" / file_name).exists()  # nothing half-downloaded left behind

    # Offline, the file given by path: no request at all.
    monkeypatch.setattr(mobilenet_v2, "BASE_WEIGHT_PATH", "http://127.0.0.1:9/unreachable/")
    served = write_imagenet_style_file(tmp_path / file_name)
    model = build_model(ModelConfig(crop=0, name="mobilenetv2", weights=str(tmp_path / file_name)), SIZE)
    np.testing.assert_array_equal(backbone_of(model).get_weights()[0], served[0])
