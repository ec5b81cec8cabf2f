"""Image decoding and resizing shared by the TFRecords writer and prediction, so a model sees
new images exactly as it saw its training images. JPEG and PNG through PIL; DICOM, known by its
content, through pneumonia.data.dicom, to the same 8-bit greyscale."""

import io
import math
import os
import stat
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from pneumonia.data import dicom
from pneumonia.data.limits import MAX_PIXELS, ImageTooLarge, check_size  # noqa: F401 - MAX_PIXELS: the limit

# PIL's own check (a warning from 89 MP, its DecompressionBombError from 179 MP) is off: open_image, the
# path every image takes, refuses from MAX_PIXELS with the size and what to do, whatever the size.
Image.MAX_IMAGE_PIXELS = None
# An image whose grey values barely vary shows nothing (a blank export, a DICOM whose header maps every
# value to one grey): refused, not given a label. A chest X-ray's vary by ~50 (standard deviation).
MIN_GREY_STD = 1.0


class BlankImage(ValueError):
    pass


def check_not_blank(grey: np.ndarray) -> None:
    """A BlankImage when the 8-bit `grey` values vary by less than MIN_GREY_STD (standard deviation)."""
    if (spread := float(np.std(grey))) < MIN_GREY_STD:
        raise BlankImage(f"the image is blank: its grey values vary by {spread:.2f} (standard deviation, 0..255), "
                         f"under {MIN_GREY_STD}; nothing to classify: check the export")


def check_regular_file(source: bytes | str | Path) -> None:
    """A path that is not a regular file is refused before it is opened: a FIFO would block the reader until
    something writes to it."""
    if not isinstance(source, bytes) and not stat.S_ISREG(os.stat(source).st_mode):
        raise ValueError(f"{source} is not a regular file (a FIFO, device or socket): name an image file")


def dimensions(source: bytes | str | Path) -> tuple[int, int]:
    """(width, height) from the file's header (JPEG, PNG, DICOM), no pixel decoded."""
    check_regular_file(source)
    if dicom.is_dicom(source):
        _, width, height = dicom.dimensions(source if isinstance(source, bytes) else str(source))
        return width, height
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return image.size


def open_image(source: bytes | str) -> Image.Image:
    """Open (not yet decode) a JPEG/PNG; an image over MAX_PIXELS is refused from its header, a path that is
    not a regular file (check_regular_file) before it is opened.

    A DICOM file is refused the same way, then decoded to 8-bit greyscale ("L") at once
    (dicom.DicomError when it is not a single greyscale X-ray it can decode).
    """
    check_regular_file(source)
    if dicom.is_dicom(source):
        dataset, width, height = dicom.dimensions(source)
        check_size(width, height)
        return Image.fromarray(dicom.grey_pixels(dataset))  # uint8 (h, w): mode "L"
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    try:
        check_size(*image.size)
    except ImageTooLarge:
        image.close()
        raise
    return image


def to_grey(image: Image.Image) -> Image.Image:
    """8-bit grayscale ("L") of any PIL mode a JPEG, PNG or TIFF opens as, turned as image viewers show it.

    An EXIF orientation (what a viewer's lossless "rotate" writes, and phones and some exports set) is
    applied, as browsers and viewers apply it: the model classifies the X-ray the user sees, not the
    pixels as stored on their side (which it would score, and flag, as another kind of image).

    16-bit (I;16*), 32-bit integer (I) and float (F) grey are scaled to 0..255 from the range their values use:
    0..2^n - 1 for the fewest bits n (8 or more) that hold the brightest value, and 0..1 for floats none above 1
    (PIL's own convert clips everything above 255 to white). So a full-range 16-bit image is scaled from 0..65535,
    and a 10 to 14-bit detector's values stored unscaled in a 16-bit PNG (a raw DICOM export: PNG's sBIT chunk,
    which would say so, is rarely written and PIL does not read it) are not taken as nearly black.

    Alpha (LA, RGBA, PA) is dropped: the grey values stored are the X-ray, transparency is not. CMYK,
    palette and 1-bit go through PIL's conversion (1-bit: 0 and 255).
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        pixels = np.asarray(image)
        if image.mode == "F" and not np.isfinite(pixels).all():  # 32-bit float (TIFF)
            raise ValueError("the image has pixel values that are not finite (NaN or infinity): export it again")
        pixels = np.clip(pixels, 0, None)  # I and F are signed: below 0 is black
        top = float(pixels.max(initial=0))
        full = 1.0 if image.mode == "F" and top <= 1 else 2.0 ** max(8, math.ceil(math.log2(top + 1))) - 1
        return Image.fromarray(np.rint(pixels * np.float32(255 / full)).astype(np.uint8))
    return image.convert("L")


def load_resized(source: bytes | str, size: int) -> Image.Image:
    """Decode a JPEG/PNG (grayscale or colour, 8 or 16 bit, up to MAX_PIXELS) or a DICOM X-ray to a
    `size` x `size` grayscale image; a blank one (check_not_blank) is refused.

    Chest X-rays carry no colour information; the few RGB files in the Kaggle set are grey too.
    """
    image = open_image(source)
    # JPEG draft mode decodes at a reduced scale directly: several times faster on the
    # ~2000 px originals, and the result is resized down anyway.
    image.draft("L", (size, size))
    resized = to_grey(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    check_not_blank(np.asarray(resized))
    return resized


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def resized_jpeg(path: str, size: int, quality: int) -> tuple[bytes | None, str]:
    """(JPEG bytes, "") for a readable image, (None, reason) otherwise; safe to run in a worker."""
    try:
        return encode_jpeg(load_resized(path, size), quality), ""
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "not a readable image"
        return None, f"{type(exc).__name__}: {exc}"


def resized_jpegs(paths: list[str], size: int, quality: int) -> list[tuple[bytes | None, str]]:
    """resized_jpeg of several files: one inter-process round trip for a chunk of images."""
    return [resized_jpeg(path, size, quality) for path in paths]
