"""Image decoding shared by prepare, TFRecords, `pneumonia predict` and serving (pneumonia.data.images):
every PIL mode a JPEG or PNG opens as comes out as the grey values it stores, and huge images are
refused from their header."""

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image

from dicoms import dataset, file_bytes
from pneumonia.classifier import model_input
from pneumonia.data.audit import inspect_file
from pneumonia.data.images import MAX_PIXELS, BlankImage, ImageTooLarge, load_resized, resized_jpeg

GRADIENT = np.tile(np.linspace(0, 255, 256).round().astype(np.uint8), (256, 1))


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def grey(data: bytes) -> np.ndarray:
    """The decoded grey values, at the (square) source size."""
    return np.asarray(load_resized(data, 256), dtype=np.float64)


def as_16_bit(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels.astype(np.uint16) * 257)


def test_16_bit_grey_is_scaled_by_its_bit_depth_not_clipped():
    expected = grey(encoded(Image.fromarray(GRADIENT, mode="L")))
    decoded = grey(encoded(as_16_bit(GRADIENT)))
    assert Image.open(io.BytesIO(encoded(as_16_bit(GRADIENT)))).mode == "I;16"
    # Before: convert("L") clipped all values above 255, mean 254.
    np.testing.assert_array_equal(decoded, expected)


def test_a_16_bit_xray_is_the_same_model_input_as_its_8_bit_version(sample_zip, tmp_path):
    with zipfile.ZipFile(sample_zip) as archive:
        name = next(name for name in sorted(archive.namelist())
                    if "/test/PNEUMONIA/" in name and name.endswith(".jpeg"))
        xray = np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L"))
    eight, sixteen = encoded(Image.fromarray(xray, mode="L")), encoded(as_16_bit(xray))
    # The model sees identical pixels, so its prediction is identical.
    np.testing.assert_array_equal(model_input(sixteen, 160, 95), model_input(eight, 160, 95))
    # prepare's statistics too
    (tmp_path / "8.png").write_bytes(eight)
    (tmp_path / "16.png").write_bytes(sixteen)
    facts = [inspect_file(tmp_path / name, "test", 1) for name in ("8.png", "16.png")]
    assert facts[0].error == facts[1].error == "" and facts[0].mean == facts[1].mean


@pytest.mark.parametrize("bits", [10, 12, 14])
def test_an_xray_exported_unscaled_to_16_bits_is_the_same_model_input_as_its_8_bit_version(repo_sample, bits):
    """A detector's 10 to 14-bit values stored unscaled in a 16-bit PNG (a raw DICOM export, no sBIT chunk) are
    scaled from the range they use. Before, from 0..65535: a 12-bit X-ray came out nearly black (0..16), and on
    the baseline's validation X-rays 28% of pneumonia was missed at 12 bits, at 10 bits most were refused as
    blank; nothing flagged them (docs/reliability.md)."""
    with zipfile.ZipFile(repo_sample) as archive:
        name = next(name for name in sorted(archive.namelist()) if "/test/PNEUMONIA/" in name)
        xray = np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L"))
    assert xray.max() >= 128  # its brightest value needs all `bits`, as an exposed X-ray's does
    stored = (xray.astype(np.int64) * (2**bits - 1) // 255).astype(np.uint16)
    assert Image.open(io.BytesIO(encoded(Image.fromarray(stored)))).mode == "I;16"
    np.testing.assert_array_equal(model_input(encoded(Image.fromarray(stored)), 128, 95),
                                  model_input(encoded(Image.fromarray(xray)), 128, 95))


@pytest.mark.parametrize("top", [1.0, 255.0, 4095.0])
def test_a_float_xray_is_the_same_model_input_as_its_8_bit_version(repo_sample, top):
    """A 32-bit float TIFF (a research pipeline's export) in 0..1, 0..255 or a detector's 0..4095. Before, clipped
    to 0..255: 0..1 was refused as blank, 0..4095 came out white (112 grey levels off on average)."""
    with zipfile.ZipFile(repo_sample) as archive:
        name = next(name for name in sorted(archive.namelist()) if "/test/NORMAL/" in name)
        xray = np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L"))
    assert xray.max() >= 128
    stored = Image.fromarray((xray * np.float32(top / 255)).astype(np.float32), mode="F")
    np.testing.assert_array_equal(model_input(encoded(stored, "TIFF"), 128, 95),
                                  model_input(encoded(Image.fromarray(xray)), 128, 95))


@pytest.mark.parametrize(("size", "quality"), [(128, 95), (224, 90)])
def test_the_model_input_is_decoded_as_tensorflow_decodes_it(repo_sample, size, quality):
    """issue 36: the model input's JPEG is decoded by simplejpeg, so that predict runs without TensorFlow, into the
    pixels tf.io.decode_jpeg gives training (its fast integer IDCT; PIL's accurate one is up to 14 grey levels
    off), on 60 X-rays of the committed sample."""
    import tensorflow as tf

    from pneumonia.data.images import encode_jpeg

    with zipfile.ZipFile(repo_sample) as archive:
        names = sorted(name for name in archive.namelist() if name.endswith(".jpeg"))
        files = [archive.read(name) for name in names[::len(names) // 60][:60]]
    for data in files:
        by_tensorflow = tf.io.decode_jpeg(encode_jpeg(load_resized(data, size), quality), channels=3).numpy()
        np.testing.assert_array_equal(model_input(data, size, quality), by_tensorflow)


@pytest.mark.parametrize(("mode", "fmt", "tolerance"), [
    ("RGB", "PNG", 0), ("RGB", "JPEG", 2), ("CMYK", "JPEG", 2), ("P", "PNG", 0), ("LA", "PNG", 0), ("RGBA", "PNG", 0),
])
def test_colour_palette_and_alpha_modes_give_their_grey_values(mode, fmt, tolerance):
    image = Image.fromarray(GRADIENT, mode="L").convert(mode)
    if "A" in mode:
        # Alpha is dropped, not composited: a half-transparent X-ray keeps its stored grey values.
        image.putalpha(Image.new("L", image.size, 128))
    data = encoded(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    assert np.abs(grey(data) - GRADIENT).max() <= tolerance


def test_1_bit_images_are_black_and_white():
    data = encoded(Image.fromarray(GRADIENT, mode="L").convert("1"))
    assert Image.open(io.BytesIO(data)).mode == "1"
    assert set(np.unique(grey(data))) <= {0.0, 255.0}


# How each EXIF orientation stores an upright image: the transposition that ImageOps.exif_transpose undoes
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}


def stored_with_orientation(upright: Image.Image, orientation: int, fmt: str, **options) -> bytes:
    """`upright` as a viewer's lossless rotate or a phone saves it: the pixels turned, the EXIF tag saying how to
    turn them back for display."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    upright.transpose(STORED_AS[orientation]).save(buffer, format=fmt, exif=exif, **options)
    return buffer.getvalue()


def test_an_exif_orientation_is_applied_as_image_viewers_apply_it(repo_sample):
    """An X-ray that every viewer shows upright is classified upright. Before, the model saw the stored pixels:
    on their side, its normal X-rays were called pneumonia and flagged as unlike the training X-rays."""
    with zipfile.ZipFile(repo_sample) as archive:
        name = next(name for name in sorted(archive.namelist()) if "/test/NORMAL/" in name)
        xray = Image.open(io.BytesIO(archive.read(name))).convert("L").crop((0, 0, 224, 180))  # not square
    upright = model_input(encoded(xray), 128, 95)
    for orientation in STORED_AS:  # lossless: the same pixels exactly
        assert np.array_equal(model_input(stored_with_orientation(xray, orientation, "PNG"), 128, 95), upright), \
            orientation
    sixteen = Image.fromarray(np.asarray(xray).astype(np.uint16) * 257)
    assert np.array_equal(model_input(stored_with_orientation(sixteen, 6, "PNG"), 128, 95), upright)

    # A JPEG four times the size (decoded at a reduced scale first, then turned): as close to the upright JPEG as
    # two encodings are
    large = xray.resize((896, 720))
    as_jpeg = model_input(encoded(large, "JPEG"), 128, 95).astype(float)
    turned = model_input(stored_with_orientation(large, 6, "JPEG", quality=95), 128, 95).astype(float)
    as_stored = model_input(encoded(large.transpose(STORED_AS[6]), "JPEG"), 128, 95).astype(float)
    assert np.abs(turned - as_jpeg).mean() < 2 < np.abs(as_stored - as_jpeg).mean()


def huge_png(width: int, height: int) -> bytes:
    """A valid all-black grey PNG of width x height: a few hundred KiB however many pixels it has."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, row, parts = zlib.compressobj(9), bytes(width + 1), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def test_a_90_megapixel_image_is_refused_before_decoding(tmp_path):
    data = huge_png(9500, 9500)  # between PIL's warning (89 MP) and its error (179 MP)
    assert len(data) < 200_000
    # Before: decoded in full (~90 MB) with only PIL's DecompressionBombWarning.
    with pytest.raises(ImageTooLarge, match=r"9500 x 9500 = 90 megapixels, more than the 36 megapixel limit"):
        load_resized(data, 160)
    # The TFRecords writer skips it with the reason, and prepare counts it unreadable.
    (tmp_path / "huge.png").write_bytes(data)
    jpeg, reason = resized_jpeg(str(tmp_path / "huge.png"), 160, 95)
    assert jpeg is None and "megapixel limit" in reason
    assert "megapixel limit" in inspect_file(tmp_path / "huge.png", "train", 0).error


def test_an_image_at_the_limit_is_decoded():
    side = int(MAX_PIXELS ** 0.5)
    with pytest.raises(BlankImage):  # decoded: all black, so refused as blank only then
        load_resized(huge_png(side, side), 64)


@pytest.mark.parametrize("side", [9500, 15000, 60000])
def test_every_image_over_the_limit_gets_the_projects_message(side):
    """issue 27: above ~179 MP PIL refused first, with its own DecompressionBombError; a header alone tells."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header_only = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                   + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    with pytest.raises(ImageTooLarge, match=rf"{side} x {side} = \d+ megapixels, more than the 36 megapixel limit"):
        load_resized(header_only, 64)


@pytest.mark.parametrize("form", ["png", "jpeg", "16-bit png", "dicom"])
def test_a_blank_image_is_refused_everywhere_an_image_goes_in(form, tmp_path):
    """A uniform image (nearly: JPEG noise of a grey level) is refused with its reason, by load_resized
    (`pneumonia predict`, serving, `adapt`, the TFRecords writer) and by the audit (prepare, the external stage);
    a gradient of 0..255 is not. Before: a label and a probability for an image of nothing."""
    uniform = np.full((64, 64), 77, np.uint8)
    uniform[0, 0] = 78  # nearly constant
    data = {"png": lambda: encoded(Image.fromarray(uniform)), "jpeg": lambda: encoded(Image.fromarray(uniform), "JPEG"),
            "16-bit png": lambda: encoded(as_16_bit(uniform)), "dicom": lambda: file_bytes(dataset(uniform, 8))}[form]()
    with pytest.raises(BlankImage, match=r"the image is blank: its grey values vary by 0\.\d+ \(standard deviation"):
        load_resized(data, 32)
    (tmp_path / "blank").write_bytes(data)
    assert inspect_file(tmp_path / "blank", "test", 0).error.startswith("BlankImage: the image is blank")
    assert np.asarray(load_resized(encoded(Image.fromarray(GRADIENT[:64, :64] * 4)), 32)).std() > 1


def test_a_float_image_with_nan_is_refused(tmp_path):
    pixels = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    pixels[3, 3] = np.nan
    with pytest.raises(ValueError, match=r"pixel values that are not finite \(NaN or infinity\)"):
        load_resized(encoded(Image.fromarray(pixels, mode="F"), "TIFF"), 32)
