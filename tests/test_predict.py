"""`pneumonia predict`: the preprocessing of training, per-file errors, table/CSV/JSON outputs."""

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from bundles import write_settings
from conftest import tool_env
from pneumonia import cli, inference
from pneumonia.classifier import Classifier, model_input
from pneumonia.config import ModelConfig
from pneumonia.data import dataset
from pneumonia.data.manifest import read_manifest
from pneumonia.engines import KerasEngine
from pneumonia.errors import PipelineError
from pneumonia.models.build import build_model


class MeanBrightness:
    """A stand-in model: the probability of pneumonia is the mean brightness of the image."""

    input_shape = (None, 32, 32, 3)

    def predict_on_batch(self, images):
        return images.reshape(len(images), -1).mean(axis=1, keepdims=True) / 255


def by_brightness(threshold: float = 0.5, jpeg_quality: int = 95) -> Classifier:
    return Classifier(KerasEngine(MeanBrightness()), threshold, jpeg_quality)


def save_image(path: Path, mode: str, size: tuple[int, int], value: int, fmt: str) -> Path:
    """An image of mean grey `value`: its left half 4 darker, its right half 4 brighter (a uniform one is blank)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = np.full(size[::-1], value - 4, np.uint8)
    grey[:, size[0] // 2:] = value + 4
    Image.fromarray(grey).convert(mode).save(path, format=fmt)
    return path


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    """Bright and dark images in every accepted form, a text file named like an image, a truncated JPEG."""
    folder = tmp_path / "xrays"
    (folder / "nested").mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image: not picked from a folder")
    (folder / "text.png").write_text("not an image, named like one")
    jpeg = io.BytesIO()
    Image.new("L", (300, 300), 128).save(jpeg, format="JPEG")
    (folder / "nested" / "truncated.jpeg").write_bytes(jpeg.getvalue()[:200])
    return {
        "bright_png_grey": save_image(folder / "bright.png", "L", (50, 70), 250, "PNG"),
        "dark_jpeg_rgb": save_image(folder / "dark.JPG", "RGB", (640, 480), 5, "JPEG"),
        "bright_jpeg_rgb": save_image(folder / "nested" / "bright_rgb.jpeg", "RGB", (20, 20), 240, "JPEG"),
        "not_an_image": folder / "text.png",
        "truncated": folder / "nested" / "truncated.jpeg",
        "folder": folder,
    }


def test_model_input_is_the_training_image(synthetic_data):
    """The same file through prediction and through the TFRecords writer + tf.data reader: equal pixels."""
    records = read_manifest(synthetic_data / "data/manifests/val.csv")
    manifest = {Path(record.path).name: record.path for record in records}
    meta = json.loads((synthetic_data / "data/tfrecords/meta.json").read_text())
    compared = 0
    for example in dataset.records(synthetic_data / "data/tfrecords", "val").take(4).as_numpy_iterator():
        path = synthetic_data / manifest[example["file_name"].decode()]
        expected = example["image"]
        actual = model_input(path, meta["image_size"], jpeg_quality=95)
        assert actual.dtype == np.uint8 and actual.shape == expected.shape == (48, 48, 3)
        np.testing.assert_array_equal(actual, expected)
        compared += 1
    assert compared == 4


def test_every_readable_file_is_predicted_and_each_bad_one_gets_its_error(images):
    classifier = by_brightness()
    files = [images["dark_jpeg_rgb"], images["not_an_image"], images["bright_png_grey"],
             images["truncated"], images["folder"] / "missing.png"]
    results = inference.predict_files(classifier, files)

    assert [result.file for result in results] == [str(file) for file in files]
    dark, text, bright, truncated, missing = results
    assert dark.label == "NORMAL" and dark.probability < 0.1 and dark.error is None
    assert bright.label == "PNEUMONIA" and bright.probability > 0.9
    for failed in (text, truncated, missing):
        assert failed.probability is None and failed.label is None
        assert failed.error.startswith("not a readable image")
    assert "UnidentifiedImageError" in text.error and "FileNotFoundError" in missing.error


def test_label_follows_the_threshold(images):
    bright = [images["bright_png_grey"]]
    probability = inference.predict_files(by_brightness(), bright)[0].probability
    assert inference.predict_files(by_brightness(probability), bright)[0].label == "PNEUMONIA"
    assert inference.predict_files(by_brightness(probability + 1e-6), bright)[0].label == "NORMAL"


def test_folders_give_their_image_files_recursively_and_say_what_they_leave_out(images, capsys):
    """JPEG, PNG and TIFF by name (DICOM by content too: tests/test_dicom.py); any other file of a folder is
    left out, and said so, not skipped unawares (a BMP or WebP export); hidden files and macOS litter (AppleDouble
    `._*` files, named like images) are skipped: tried, they failed the run as unreadable images."""
    folder = images["folder"]
    save_image(folder / "nested" / "scan.TIFF", "L", (40, 40), 128, "TIFF")
    save_image(folder / "export.bmp", "L", (40, 40), 128, "BMP")
    (folder / ".DS_Store").write_bytes(b"\0" * 8)
    (folder / "._bright.png").write_bytes(b"\0" * 8)
    found, left_out = inference.image_files([folder])
    assert sorted(file.name for file in found) == ["bright.png", "bright_rgb.jpeg", "dark.JPG", "scan.TIFF",
                                                   "text.png", "truncated.jpeg"]
    assert sorted(file.name for file in left_out) == ["export.bmp", "notes.txt"]
    [tiff] = [result for result in inference.predict_files(by_brightness(), found) if result.file.endswith("TIFF")]
    assert tiff.error is None and 0 <= tiff.probability <= 1
    inference.say_left_out(left_out)
    said = capsys.readouterr().err
    assert "2 file(s) in the folders left out, not JPEG, PNG, TIFF or DICOM" in said and "export.bmp" in said
    assert inference.image_files([folder / "notes.txt"]) == ([folder / "notes.txt"], [])  # named: tried as it is
    (folder / "empty").mkdir()
    with pytest.raises(PipelineError, match="no JPEG, PNG, TIFF or DICOM files"):
        inference.image_files([folder / "empty"])
    (folder / "empty" / "a.webp").write_bytes(b"RIFF")
    with pytest.raises(PipelineError, match=r"1 other file\(s\) there, e.g. a.webp: convert them"):
        inference.image_files([folder / "empty"])


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder with a (untrained) 32 px model and its settings (threshold 0.25, JPEG quality 90)."""
    monkeypatch.chdir(tmp_path)
    Path("models").mkdir()
    model = build_model(ModelConfig(crop=0), 32)
    model.save("models/model.keras")
    write_settings(Path("models/model.keras"), 0.25, jpeg_quality=90, model=model)
    return tmp_path


def test_cli_prints_writes_csv_and_json_and_fails_for_a_bad_file(project, images, capsys):
    good = [images["dark_jpeg_rgb"], images["bright_png_grey"]]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", *map(str, good), str(images["not_an_image"]), "--csv", "out.csv", "--json", "out.json",
                  "--gradcam", "cams"])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert "1 of 3 files could not be predicted" in err
    assert "predicting" not in err  # a progress bar only for runs of more than inference.PROGRESS_AFTER seconds

    model = keras.models.load_model("models/model.keras")
    expected = model.predict(np.stack([model_input(file, 32, 90) for file in good]), verbose=0).reshape(-1)
    written = json.loads(Path("out.json").read_text())
    assert [row["file"] for row in written] == [str(file) for file in [*good, images["not_an_image"]]]
    np.testing.assert_allclose([row["probability"] for row in written[:2]], expected, rtol=1e-5)
    assert [row["label"] for row in written[:2]] == ["PNEUMONIA" if p >= 0.25 else "NORMAL" for p in expected]
    assert written[2]["probability"] is None and "not a readable image" in written[2]["error"]

    rows = list(csv.DictReader(Path("out.csv").open()))
    assert [row["file"] for row in rows] == [row["file"] for row in written]
    np.testing.assert_allclose([float(row["probability"]) for row in rows[:2]], expected, rtol=1e-5)
    assert rows[2]["probability"] == "" and rows[2]["error"] == written[2]["error"]

    lines = out.splitlines()
    assert lines[0].split() == ["file", "probability", "label", "ood", "score", "flags"]
    assert lines[1].split()[:4] == [str(good[0]), f"{expected[0]:.4f}", written[0]["label"],
                                    f"{written[0]['ood_score']:.1f}"]
    assert lines[3].startswith(str(images["not_an_image"])) and "error: not a readable image" in lines[3]

    assert sorted(path.name for path in Path("cams").iterdir()) == ["bright.png.gradcam.png", "dark.JPG.gradcam.png"]
    overlay = np.asarray(Image.open("cams/dark.JPG.gradcam.png").convert("RGB")).astype(int)
    assert (overlay.max(axis=-1) - overlay.min(axis=-1)).max() > 20  # coloured by the map, not just the grey X-ray


# `pneumonia predict ...` run as `python -c WITH_IMPORTS predict ...`: on exit, stderr's last line names the
# TensorFlow and Keras modules the command imported
WITH_IMPORTS = ("import atexit, sys; from pneumonia.cli import main; atexit.register(lambda: print('imported:', "
                "sorted({name.split('.')[0] for name in sys.modules} & {'tensorflow', 'keras'}), file=sys.stderr)); "
                "main(sys.argv[1:])")


@pytest.mark.slow  # three processes, one without TensorFlow
def test_predict_with_onnx_runtime_imports_neither_tensorflow_nor_keras(project, images):
    """issue 36: TensorFlow's import was most of a one-image prediction's 7.5 s. With the bundle's model.onnx
    nothing imports it; Grad-CAM maps and a bundle without model.onnx still do."""
    command = [sys.executable, "-c", WITH_IMPORTS, "predict", str(images["dark_jpeg_rgb"]), "--json", "out.json"]
    onnx = subprocess.run(command, env=tool_env(), capture_output=True, text=True, check=True)
    assert onnx.stderr.splitlines()[-1] == "imported: []", onnx.stderr
    gradcam = subprocess.run([*command, "--gradcam", "cams"], env=tool_env(), capture_output=True, text=True,
                             check=True)
    assert gradcam.stderr.splitlines()[-1] == "imported: ['keras', 'tensorflow']", gradcam.stderr
    assert gradcam.stdout == onnx.stdout and len(list(Path("cams").iterdir())) == 1  # predicted with ONNX Runtime
    by_onnx = json.loads(Path("out.json").read_text())
    Path("models/model.onnx").unlink()
    by_keras = subprocess.run(command, env=tool_env(), capture_output=True, text=True, check=True)
    assert by_keras.stderr.splitlines()[-1] == "imported: ['keras', 'tensorflow']", by_keras.stderr
    [onnx_row], [keras_row] = by_onnx, json.loads(Path("out.json").read_text())
    assert onnx_row["probability"] == pytest.approx(keras_row["probability"], abs=1e-5)
    assert onnx_row["ood_score"] == pytest.approx(keras_row["ood_score"], abs=1e-3)  # rounded to 4 decimals


@pytest.mark.slow  # two processes that import TensorFlow
def test_the_command_prints_its_own_output_and_tensorflow_log_only_with_verbose(project, images):
    """TensorFlow's native start-up lines (oneDNN's notice, "Could not find cuda drivers", written before its log
    level applies) printed eight lines on every call; now only with --verbose. Predicting with Keras (a bundle
    without model.onnx): with ONNX Runtime TensorFlow is not imported at all."""
    Path("models/model.onnx").unlink()
    env = {key: value for key, value in tool_env().items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    command = ["pneumonia", "predict", str(images["dark_jpeg_rgb"])]
    quiet = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert quiet.stderr == "" and quiet.stdout.split()[:3] == ["file", "probability", "label"]
    verbose = subprocess.run([*command, "--verbose"], env=env, capture_output=True, text=True, check=True)
    assert re.search(r"^[IWE]\d{4} ", verbose.stderr, re.MULTILINE), verbose.stderr  # absl's log lines
    assert verbose.stdout == quiet.stdout


def test_cli_reports_the_probability_calibrated_as_the_run_calibrated_it(project, images):
    """evaluate.calibration: the evaluate stage's threshold is on the calibrated probability, so predict reports
    that probability and labels it at that threshold (parameters from the model's settings)."""
    from pneumonia.evaluation.calibration import Calibration

    calibration = Calibration("platt", scale=0.5, shift=-0.7)
    write_settings(Path("models/model.keras"), 0.25, jpeg_quality=90, calibration=calibration)
    good = [images["dark_jpeg_rgb"], images["bright_png_grey"]]
    cli.main(["predict", *map(str, good), "--json", "out.json"])
    model = keras.models.load_model("models/model.keras")
    raw = model.predict(np.stack([model_input(file, 32, 90) for file in good]), verbose=0).reshape(-1)
    written = json.loads(Path("out.json").read_text())
    np.testing.assert_allclose([row["probability"] for row in written], calibration.apply(raw), rtol=1e-5)
    assert [row["label"] for row in written] == ["PNEUMONIA" if p >= 0.25 else "NORMAL"
                                                 for p in calibration.apply(raw)]




def test_cli_without_a_model_says_what_to_do_at_once(tmp_path, images):
    """Without importing TensorFlow first: its import would be seconds spent before saying nothing is there."""
    (tmp_path / "params.yaml").write_text("{}\n")
    result = subprocess.run([sys.executable, "-c", WITH_IMPORTS, "predict", str(images["bright_png_grey"])],
                            cwd=tmp_path, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert "models/model.keras not found: train a model first" in result.stderr
    assert result.stderr.splitlines()[-1] == "imported: []", result.stderr


@pytest.mark.slow  # adapting a model: 20 s
def test_predict_and_adapt_read_a_folder_of_dicoms_and_write_no_patient_data(project, capsys):
    """`pneumonia predict` and `pneumonia adapt` on a site's DICOMs (header with made-up patient data): the
    probability of each one's PNG, an adapted model, and none of the header's values in output or files."""
    from dicoms import FORMS, SECRETS, dicom_file, png_bytes, sample_xrays

    site, pngs = Path("site"), Path("pngs")
    site.mkdir()
    pngs.mkdir()
    xrays = sample_xrays(2, width=96)
    for index, form in enumerate(FORMS):
        data, pixels = dicom_file(xrays[index % 2][1], form)
        (site / f"{index:02d}-{form}").write_bytes(data)
        (pngs / f"{index:02d}-{form}.png").write_bytes(png_bytes(pixels))

    cli.main(["predict", "site", "pngs", "--json", "out.json", "--csv", "out.csv", "--gradcam", "cams"])
    rows = json.loads(Path("out.json").read_text())
    assert len(rows) == 2 * len(FORMS) and not any(row["error"] for row in rows)
    np.testing.assert_allclose([row["probability"] for row in rows[:len(FORMS)]],
                               [row["probability"] for row in rows[len(FORMS):]], atol=1e-3)

    # --input-checks ignore: each DICOM form read and adapted to, whatever the stand-in bundle's checks flag
    cli.main(["adapt", "site", "--out", "adapted.keras", "--min-images", str(len(FORMS)), "--input-checks", "ignore"])
    out, err = capsys.readouterr()
    assert f"adapted to {len(FORMS)} images" in out
    written = "".join(path.read_bytes().decode("latin-1") for path in Path(".").rglob("*")
                      if path.is_file() and path.parent.name not in ("site", "pngs"))
    assert not [secret for secret in SECRETS if secret in out + err + written]


def test_a_truncated_model_file_is_called_damaged(project, images, capsys):
    """issue 27: a truncated .keras file said `ValueError: File not found` (the file exists)."""
    model = Path("models/model.keras")
    model.write_bytes(model.read_bytes()[:2000])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(images["bright_png_grey"]), "--model", str(model)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "models/model.keras is damaged or not a Keras model file" in err and "dvc checkout" in err
    assert "File not found" not in err


def test_an_output_file_option_naming_a_folder_is_refused_before_predicting(project, images, capsys):
    """issue 27: `--csv <folder>` failed after predicting, with a traceback, and left a .tmp-* file beside it."""
    Path("out").mkdir()
    for option in ("--csv", "--json"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["predict", str(images["bright_png_grey"]), option, "out"])
        assert exit_info.value.code == 2
        out, err = capsys.readouterr()
        assert f"{option} out is a folder: name a file" in err and out == ""  # nothing predicted
    assert sorted(path.name for path in project.iterdir()) == ["models", "out", "xrays"]


def test_a_fifo_is_refused_not_waited_on(images):
    """issue 27: a FIFO given to predict hung (waiting for a writer); a non-regular file is not an image."""
    import threading
    import time

    fifo = images["folder"] / "pipe.png"
    os.mkfifo(fifo)

    def unblock() -> None:  # so that a reader stuck on the FIFO returns and the test fails instead of hanging
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    watchdog = threading.Timer(10, unblock)
    watchdog.start()
    started = time.monotonic()
    try:
        results = inference.predict_files(by_brightness(), [fifo, images["bright_png_grey"]])
    finally:
        watchdog.cancel()
    assert time.monotonic() - started < 5
    assert "is not a regular file" in results[0].error and results[1].label == "PNEUMONIA"


@pytest.mark.parametrize("threshold", ["NaN", "Infinity", "1.5", "-0.1"])
def test_a_threshold_that_is_not_a_probability_is_refused(project, images, capsys, threshold):
    """issue 27: a NaN threshold labelled every image NORMAL, silently (then in metrics/evaluation.json, now in the
    model's settings)."""
    settings = Path("models/model.json")
    settings.write_text(settings.read_text().replace('"threshold": 0.25', f'"threshold": {threshold}'))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(images["bright_png_grey"])])
    assert exit_info.value.code == 2
    assert "models/model.json is not a model settings file of this version (threshold:" in capsys.readouterr().err
