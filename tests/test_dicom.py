"""DICOM X-rays (pneumonia.data.dicom) through the one image path: each form the same 8-bit image as its PNG,
known by content, in data.local_path, and each bad file refused with its reason (no patient data in it)."""

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import tool_env
from dicoms import FORMS, SECRETS, dataset, dicom_file, file_bytes, png_bytes, sample_xrays
from pneumonia import inference
from pneumonia.data import dicom
from pneumonia.data.audit import inspect_file
from pneumonia.data.download import copy_folder, extract_archive
from pneumonia.data.images import load_resized, open_image
from pneumonia.errors import PipelineError


@pytest.fixture(scope="module")
def xray() -> np.ndarray:
    [(_, grey)] = sample_xrays(1, width=160)
    return grey


@pytest.mark.parametrize("form", FORMS)
def test_each_form_is_the_same_8_bit_image_as_its_png(xray, form):
    data, grey = dicom_file(xray, form)
    assert dicom.is_dicom(data) and pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == FORMS[form][0]
    assert np.array_equal(np.asarray(open_image(data)), grey)
    assert np.array_equal(np.asarray(load_resized(data, 48)), np.asarray(load_resized(png_bytes(grey), 48)))
    if FORMS[form][1]:
        assert np.array_equal(grey, xray)  # lossless: the X-ray itself


def test_a_window_clips_and_monochrome1_is_inverted():
    stored = np.array([[0, 1000, 13750, 26500, 65535]], dtype=np.uint16)
    windowed = np.asarray(open_image(file_bytes(dataset(stored, 16, WindowCenter=13750.5, WindowWidth=25501))))
    assert windowed.tolist() == [[0, 0, 128, 255, 255]]  # outside the window: black or white
    inverted = np.asarray(open_image(file_bytes(dataset(stored, 16, "MONOCHROME1", WindowCenter=13750.5,
                                                        WindowWidth=25501))))
    assert inverted.tolist() == [[255, 255, 128, 0, 0]]  # the middle (127.5) rounds to even either way
    # No window: the stored bits' range (12 here) scaled to 0..255, whatever the rescale slope and intercept.
    plain = np.asarray(open_image(file_bytes(dataset(np.array([[0, 2048, 4095]]), 12, RescaleSlope=2,
                                                     RescaleIntercept=-500))))
    assert plain.tolist() == [[0, 128, 255]]


def test_dicom_is_known_by_its_content_not_its_name(xray, tmp_path):
    data, _ = dicom_file(xray, "mono2_8bit")
    (tmp_path / "site" / "series").mkdir(parents=True)
    (tmp_path / "site" / "series" / "IM000001").write_bytes(data)  # a PACS export: no suffix
    (tmp_path / "site" / "b.dcm").write_bytes(data)
    (tmp_path / "site" / "notes.txt").write_text("x" * 200)
    assert inference.image_files([tmp_path / "site"]) == [tmp_path / "site" / "b.dcm",
                                                          tmp_path / "site" / "series" / "IM000001"]
    facts = inspect_file(tmp_path / "site" / "series" / "IM000001", "test", 0)
    assert (facts.width, facts.height, facts.mode, facts.error) == (xray.shape[1], xray.shape[0], "L", "")


def test_data_local_path_takes_a_kaggle_layout_of_dicom_files(xray, tmp_path):
    data, _ = dicom_file(xray, "jpeg2000_lossless")
    members = {f"chest_xray/{split}/{label}/{split}-{label}-{index}{suffix}": data
               for split in ("train", "test") for label in ("NORMAL", "PNEUMONIA")
               for index, suffix in ((1, ".dcm"), (2, ""))}
    members["chest_xray/train/NORMAL/readme"] = b"not an image"
    folder = tmp_path / "local"
    for name, content in members.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    with zipfile.ZipFile(tmp_path / "local.zip", "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    expected = sorted(name.removeprefix("chest_xray/") for name in members if not name.endswith("readme"))
    for source, copy in ((folder, copy_folder), (tmp_path / "local.zip", extract_archive)):
        out = tmp_path / f"raw-{source.name}"
        copy(source, out)
        assert sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file()) == expected


def bad_dicoms(xray: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """{case: (file, what the error says)}."""
    no_pixels = dataset(xray, 8)
    del no_pixels.PixelData
    frames = dataset(np.concatenate([xray, xray]), 8, NumberOfFrames=2, Rows=xray.shape[0])
    colour = dataset(np.repeat(xray[..., None], 3, axis=2), 8, "RGB", SamplesPerPixel=3, PlanarConfiguration=0)
    whole, _ = dicom_file(xray, "mono1_12bit_rescaled")
    return {
        "no-pixel-data": (file_bytes(no_pixels), r"holds no \(integer\) Pixel Data"),
        "multi-frame": (file_bytes(frames), "holds 2 frames: send single-frame images"),
        "colour": (file_bytes(colour), r"is RGB with 3 sample\(s\) a pixel, not greyscale"),
        "ct": (file_bytes(dataset(xray, 8, modality="CT")), r"modality is 'CT', not an X-ray \(CR or DX\)"),
        "truncated-pixels": (whole[:len(whole) // 2], "pixel data cannot be decoded .* may be truncated"),
        # cut inside the header: pydicom reads what is there, so the image is missing
        "truncated-header": (whole[:300], r"holds no \(integer\) Pixel Data.* cut short"),
    }


@pytest.mark.parametrize("case", ["no-pixel-data", "multi-frame", "colour", "ct", "truncated-pixels",
                                  "truncated-header"])
def test_a_bad_dicom_is_refused_with_its_reason_and_no_patient_data(xray, case):
    data, message = bad_dicoms(xray)[case]
    with pytest.raises(dicom.DicomError, match=message) as refused:
        load_resized(data, 48)
    assert isinstance(refused.value, PipelineError)
    assert not [secret for secret in SECRETS if secret in str(refused.value)]


def test_a_compressed_syntax_without_its_decoder_names_the_package_to_install(xray, tmp_path):
    """python-gdcm absent (its import made to fail, as in an environment without it): JPEG lossless refused."""
    data, _ = dicom_file(xray, "jpeg_lossless")
    (tmp_path / "lossless.dcm").write_bytes(data)
    script = ("import sys; sys.modules['gdcm'] = None\n"
              "from pneumonia.data.images import load_resized\n"
              f"load_resized({str(tmp_path / 'lossless.dcm')!r}, 48)")
    result = subprocess.run([sys.executable, "-c", script], env=tool_env(), capture_output=True, text=True)
    assert result.returncode != 0
    assert "DicomError: the DICOM file is compressed as JPEG Lossless" in result.stderr
    assert "no decoder for it is installed: `pip install python-gdcm`" in result.stderr


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    from pneumonia.data.images import ImageTooLarge

    huge = dataset(np.zeros((1, 1), np.uint8), 8)
    huge.Rows, huge.Columns = 10_000, 10_000  # the header says 100 megapixels; the pixels are never decoded
    with pytest.raises(ImageTooLarge, match="more than the 36 megapixel limit"):
        open_image(file_bytes(huge))


def test_the_predict_cli_exits_non_zero_naming_the_bad_dicom(xray, tmp_path, monkeypatch, capsys):
    from pneumonia import classifier, cli
    from test_predict import MeanBrightness

    data, message = bad_dicoms(xray)["ct"]
    (tmp_path / "ct.dcm").write_bytes(data)
    monkeypatch.setattr(classifier, "load_classifier", lambda *args: classifier.Classifier(MeanBrightness(), 0.5, 90))
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "ct.dcm"])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert "ct.dcm" in out and "modality is 'CT', not an X-ray" in out and "1 of 1 files could not be predicted" in err
