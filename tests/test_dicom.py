"""DICOM X-rays (pneumonia.data.dicom) through the one image path: each form the same 8-bit image as its PNG,
known by content, in data.local_path, and each bad file refused with its reason (no patient data in it)."""

import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate

from conftest import tool_env
from dicoms import (
    FORMS,
    SECRETS,
    bare_dataset,
    dataset,
    deflate_bomb,
    dicom_file,
    file_bytes,
    gdcm_compressed,
    j2k_bomb,
    jpeg_bomb,
    png_bytes,
    rle_bomb,
    sample_xrays,
)
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
    assert inference.image_files([tmp_path / "site"]) == ([tmp_path / "site" / "b.dcm",
                                                           tmp_path / "site" / "series" / "IM000001"],
                                                          [tmp_path / "site" / "notes.txt"])
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


def short_modality_lut(xray: np.ndarray):
    """A Modality LUT Sequence whose LUT data is shorter than its descriptor's 256 entries."""
    from pydicom.dataset import Dataset

    lut = Dataset()
    lut.LUTDescriptor, lut.ModalityLUTType = [256, 0, 16], "US"
    lut.LUTData = np.arange(10, dtype=np.uint16).tobytes()
    lut["LUTData"].VR = "OW"
    return dataset(xray, 8, ModalityLUTSequence=[lut])


def bad_dicoms(xray: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """{case: (file, what the error says)}."""
    no_pixels = dataset(xray, 8)
    del no_pixels.PixelData
    frames_not_a_number = file_bytes(dataset(xray, 8, NumberOfFrames=12)).replace(b"IS\x02\x0012", b"IS\x02\x00ab")
    wide = dataset(xray, 8, BitsAllocated=32, PixelData=xray.astype(np.uint32).tobytes())
    not_finite = "turn stored values into NaN or infinity: its header is damaged"
    frames = dataset(np.concatenate([xray, xray]), 8, NumberOfFrames=2, Rows=xray.shape[0])
    colour = dataset(np.repeat(xray[..., None], 3, axis=2), 8, "RGB", SamplesPerPixel=3, PlanarConfiguration=0)
    whole, _ = dicom_file(xray, "mono1_12bit_rescaled")
    rle_of_two_segments = pydicom.dcmread(io.BytesIO(dicom_file(xray, "rle")[0]))  # 16 bits: a segment a byte
    rle_of_two_segments.BitsAllocated = rle_of_two_segments.BitsStored = 8
    return {
        "no-pixel-data": (file_bytes(no_pixels), r"holds no \(integer\) Pixel Data"),
        "multi-frame": (file_bytes(frames), "holds 2 frames: send single-frame images"),
        "colour": (file_bytes(colour), r"is RGB with 3 sample\(s\) a pixel, not greyscale"),
        "ct": (file_bytes(dataset(xray, 8, modality="CT")), r"modality is 'CT', not an X-ray \(CR or DX\)"),
        "truncated-pixels": (whole[:len(whole) // 2], "pixel data cannot be decoded .* may be truncated"),
        # cut inside the header: pydicom reads what is there, so the image is missing
        "truncated-header": (whole[:300], r"holds no \(integer\) Pixel Data.* cut short"),
        "slope-nan": (file_bytes(dataset(xray, 8, RescaleSlope="NaN", RescaleIntercept=0)), not_finite),
        "slope-inf": (file_bytes(dataset(xray, 8, RescaleSlope="inf", RescaleIntercept=0)), not_finite),
        "slope-0": (file_bytes(dataset(xray, 8, RescaleSlope=0, RescaleIntercept=0)),
                    "map every stored value to the same grey .* the image would be blank"),
        "window-centre-nan": (file_bytes(dataset(xray, 8, WindowCenter="NaN", WindowWidth=100)), not_finite),
        "frames-not-a-number": (frames_not_a_number, "NumberOfFrames is not a whole number"),
        "short-modality-lut": (file_bytes(short_modality_lut(xray)),
                               r"modality LUT, VOI LUT or window cannot be applied \(error\): its LUT data"),
        "32-bits-allocated": (file_bytes(wide),
                              "allocates 32 bits a pixel; greyscale radiographs allocate 1, 8, 16"),
        "rle-segments-not-bits": (file_bytes(rle_of_two_segments),
                                  r"RLE image has 2 segment\(s\), its header's bits allocated say 1"),
    }


@pytest.mark.parametrize("case", ["no-pixel-data", "multi-frame", "colour", "ct", "truncated-pixels",
                                  "truncated-header", "slope-nan", "slope-inf", "slope-0", "window-centre-nan",
                                  "frames-not-a-number", "short-modality-lut", "32-bits-allocated",
                                  "rle-segments-not-bits"])
def test_a_bad_dicom_is_refused_with_its_reason_and_no_patient_data(xray, case):
    data, message = bad_dicoms(xray)[case]
    with pytest.raises(dicom.DicomError, match=message) as refused:
        load_resized(data, 48)
    assert isinstance(refused.value, PipelineError)
    assert "\n" not in str(refused.value)  # one line: a row of `pneumonia predict`'s table
    assert not [secret for secret in SECRETS if secret in str(refused.value)]


def test_pydicom_warnings_and_log_records_do_not_reach_stderr(xray, tmp_path):
    """NumberOfFrames 0 (pydicom warns and logs, quoting it) and a JPEG of more frames than its header says (read:
    its first frame only), a rescale slope of NaN (refused): nothing on stderr, under every command's logging."""
    zero_frames = dataset(xray, 8)
    zero_frames.add_new("NumberOfFrames", "IS", "0")
    (tmp_path / "zero-frames.dcm").write_bytes(file_bytes(zero_frames))
    slope_nan = dataset(xray, 8, RescaleSlope="NaN", RescaleIntercept=0)
    (tmp_path / "slope-nan.dcm").write_bytes(file_bytes(slope_nan))
    buffer = io.BytesIO()
    Image.fromarray(xray).save(buffer, format="JPEG")
    extra_frames = dataset(xray, 8)  # one frame by its header, two JPEG frames in its offset table
    extra_frames.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    extra_frames.PixelData = encapsulate([buffer.getvalue()] * 2, has_bot=True)
    extra_frames["PixelData"].VR = "OB"
    (tmp_path / "extra-frames.dcm").write_bytes(file_bytes(extra_frames))
    script = ("import logging, sys\nlogging.basicConfig(level=logging.INFO)\n"
              "from pneumonia.data.images import load_resized\n"
              "load_resized(sys.argv[1], 48)\nload_resized(sys.argv[3], 48)\n"
              "try:\n    load_resized(sys.argv[2], 48)\nexcept Exception as exc:\n    print(type(exc).__name__)\n")
    result = subprocess.run([sys.executable, "-c", script, *(str(tmp_path / f"{name}.dcm") for name in
                                                               ("zero-frames", "slope-nan", "extra-frames"))],
                            env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("DicomError\n", "")


PEAK_MEGABYTES = 500  # what reading one input may cost at most, the interpreter and its libraries included
BOMBS = {  # case: (the file, the refusal)
    "jpeg-20000-in-100": (lambda: jpeg_bomb(20000), r"ImageTooLarge: 20000 x 20000 = 400 megapixels in its JPEG"),
    "jpeg2000-12000-in-100": (lambda: j2k_bomb(12000),
                              r"ImageTooLarge: 12000 x 12000 = 144 megapixels in its JPEG 2000"),
    "jpeg-2000-in-100": (lambda: jpeg_bomb(2000), r"DicomError: .*JPEG Baseline.* image is 2000 x 2000 with 1 "
                                                   r"component\(s\), its header says 100 x 100 greyscale"),
    # one frame by its header, 30 in its offset table: pydicom decoded them all
    "jpeg-30-frames-of-4000": (lambda: jpeg_bomb(4000, rows=4000, frames=30), "BlankImage: the image is blank"),
    # pydicom's RLE decoder expands a segment whole before comparing it with the header's size
    "rle-640-mb-in-100": (lambda: rle_bomb(640 * 2**20), r"DicomError: the DICOM file's RLE image decodes to more "
                                                          r"than 2 times its header's 100 x 100 pixels"),
    "deflated-to-320-mb": (lambda: deflate_bomb(320 * 2**20), "DicomError: the DICOM file's deflated dataset "
                                                              "inflates to more than 77 MiB"),
    "deflated-without-preamble": (lambda: deflate_bomb(320 * 2**20)[132:], "DicomError: the DICOM file's deflated "
                                                                           "dataset inflates to more than 77 MiB"),
}


def peak_megabytes_reading(path: Path) -> tuple[str, int]:
    """(what load_resized did with `path`, the peak resident memory of a fresh process that did it, MB)."""
    # VmHWM: this process's own peak (ru_maxrss would keep the forking test process's)
    script = ("import re, sys\nfrom pneumonia.data.images import load_resized\n"
              "try:\n    load_resized(sys.argv[1], 48)\n    print('accepted')\n"
              "except Exception as exc:\n    print(f'{type(exc).__name__}: {exc}')\n"
              "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]) // 1024)")
    result = subprocess.run([sys.executable, "-c", script, str(path)], env=tool_env(), capture_output=True,
                            text=True, timeout=120)
    outcome, peak = result.stdout.splitlines()
    return outcome, int(peak)


def test_the_largest_image_accepted_costs_under_300_megabytes(tmp_path):
    """A 6000 x 6000 (36 MP) 12-bit DICOM, the largest accepted: 241 MB peak, the interpreter and libraries
    included (was 481 MB: an int32 copy of the pixels and a clipped copy of that)."""
    stored = np.tile(np.linspace(0, 4095, 6000).astype(np.uint16), (6000, 1))  # a ramp: not blank once resized
    (tmp_path / "largest.dcm").write_bytes(file_bytes(dataset(stored, 12)))
    del stored
    outcome, peak = peak_megabytes_reading(tmp_path / "largest.dcm")
    assert outcome == "accepted" and peak < 300, (outcome, peak)


@pytest.mark.parametrize("case", BOMBS)
def test_a_memory_bomb_is_refused_before_decoding_within_half_a_gigabyte(case, tmp_path):
    """A small file whose codestream (or inflated dataset) is far larger than its DICOM header says: refused from
    the codestream's own header, or while inflating, in a fresh process whose peak memory is measured (69 to
    162 MB). Before: 1.2 GB and 18 s for the JPEG, 0.8 GB and 10 s for the JPEG 2000, 1.0 GB and 26 s for the 30
    frames, 0.7 GB for the deflated file, accepted."""
    make, refusal = BOMBS[case]
    (tmp_path / "bomb.dcm").write_bytes(make())
    outcome, peak = peak_megabytes_reading(tmp_path / "bomb.dcm")
    assert re.search(refusal, outcome), outcome
    assert peak < PEAK_MEGABYTES, f"{peak} MB"


def test_an_acr_nema_file_without_preamble_is_read_and_found_in_a_folder(xray, tmp_path):
    """An old PACS export: no preamble, no "DICM", no file meta; a 10-bit MONOCHROME1 CR, named without suffix."""
    value = xray.astype(np.float64)
    data = bare_dataset(dataset(np.rint((255 - value) * 1023 / 255), 10, "MONOCHROME1", modality="CR"))
    assert data[128:132] != b"DICM"
    (tmp_path / "export" / "series").mkdir(parents=True)
    (tmp_path / "export" / "series" / "IM0001").write_bytes(data)
    assert inference.image_files([tmp_path / "export"]) == ([tmp_path / "export" / "series" / "IM0001"], [])
    assert np.array_equal(np.asarray(open_image(data)), xray)
    facts = inspect_file(tmp_path / "export" / "series" / "IM0001", "test", 0)
    assert (facts.width, facts.height, facts.error) == (xray.shape[1], xray.shape[0], "")


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


def test_12_bit_jpeg_extended_is_refused_in_one_line_as_unsupported(xray):
    """No installed decoder reads 12-bit lossy JPEG (python-gdcm's is refused by pydicom for a known fault, Pillow
    reads 8 bits): said so, in one line. Before: two decoders' errors on several lines, and
    "the file may be truncated"."""
    data = gdcm_compressed(dataset(np.rint(xray.astype(np.float64) * 4095 / 255), 12), "1.2.840.10008.1.2.4.51")
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    with pytest.raises(dicom.DicomError) as refused:
        load_resized(data, 48)
    assert str(refused.value) == ("the DICOM file is JPEG Extended with 12-bit samples, which no decoder installed "
                                  "here reads: export it uncompressed, as JPEG Lossless or as JPEG 2000 "
                                  "(docs/data.md, DICOM)")


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    from pneumonia.data.images import ImageTooLarge

    huge = dataset(np.zeros((1, 1), np.uint8), 8)
    huge.Rows, huge.Columns = 10_000, 10_000  # the header says 100 megapixels; the pixels are never decoded
    with pytest.raises(ImageTooLarge, match="more than the 36 megapixel limit"):
        open_image(file_bytes(huge))


def test_the_predict_cli_exits_non_zero_naming_the_bad_dicom(xray, tmp_path, monkeypatch, capsys):
    from pneumonia import classifier, cli
    from test_predict import by_brightness

    data, message = bad_dicoms(xray)["ct"]
    (tmp_path / "ct.dcm").write_bytes(data)
    monkeypatch.setattr(classifier, "load_classifier", lambda *args: by_brightness(jpeg_quality=90))
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "ct.dcm"])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert "ct.dcm" in out and "modality is 'CT', not an X-ray" in out and "1 of 1 files could not be predicted" in err
