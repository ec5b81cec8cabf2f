"""Image decoding and resizing shared by the TFRecords writer and prediction, so a model sees
new images exactly as it saw its training images. JPEG and PNG through PIL; DICOM, known by its
content, through pneumonia.data.dicom, to the same 8-bit greyscale."""

import io
import os
import stat

import numpy as np
from PIL import Image

from pneumonia.data import dicom

# Refused before decoding: 6000 x 6000, over 4x the largest chest radiographs (a 43 cm detector at
# 100 um is 4300 px). PIL alone only warns up to 179 MP, and a 10000 x 10000 PNG of 380 KiB
# decodes to ~0.5 GB.
MAX_PIXELS = 36_000_000
# PIL's own check (a warning from 89 MP, its DecompressionBombError from 179 MP) is off: open_image, the
# path every image takes, refuses from MAX_PIXELS with the size and what to do, whatever the size.
Image.MAX_IMAGE_PIXELS = None


class ImageTooLarge(ValueError):
    pass


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{width} x {height} = {width * height / 1e6:.0f} megapixels, more than the "
                            f"{MAX_PIXELS / 1e6:.0f} megapixel limit: downscale the image first")


def open_image(source: bytes | str) -> Image.Image:
    """Open (not yet decode) a JPEG/PNG; an image over MAX_PIXELS is refused from its header, a path that is
    not a regular file (a FIFO would block the reader until something writes to it) before it is opened.

    A DICOM file is refused the same way, then decoded to 8-bit greyscale ("L") at once
    (dicom.DicomError when it is not a single greyscale X-ray it can decode).
    """
    if not isinstance(source, bytes) and not stat.S_ISREG(os.stat(source).st_mode):
        raise ValueError(f"{source} is not a regular file (a FIFO, device or socket): name an image file")
    if dicom.is_dicom(source):
        dataset, width, height = dicom.dimensions(source)
        _check_size(width, height)
        return Image.fromarray(dicom.grey_pixels(dataset))  # uint8 (h, w): mode "L"
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    try:
        _check_size(*image.size)
    except ImageTooLarge:
        image.close()
        raise
    return image


def to_grey(image: Image.Image) -> Image.Image:
    """8-bit grayscale ("L") of any PIL mode a JPEG or PNG opens as.

    16-bit (I;16*) and 32-bit (I) grey are scaled from their full range to 0..255 (PIL's own
    convert clips everything above 255 to white). Alpha (LA, RGBA, PA) is dropped: the grey
    values stored are the X-ray, transparency is not. CMYK, palette and 1-bit go through PIL's
    conversion (1-bit: 0 and 255).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image).astype(np.int64 if image.mode == "I" else np.uint32)  # no overflow of + 128
        return Image.fromarray(np.clip((pixels + 128) // 257, 0, 255).astype(np.uint8))
    return image.convert("L")


def load_resized(source: bytes | str, size: int) -> Image.Image:
    """Decode a JPEG/PNG (grayscale or colour, 8 or 16 bit, up to MAX_PIXELS) or a DICOM X-ray to a
    `size` x `size` grayscale image.

    Chest X-rays carry no colour information; the few RGB files in the Kaggle set are grey too.
    """
    image = open_image(source)
    # JPEG draft mode decodes at a reduced scale directly: several times faster on the
    # ~2000 px originals, and the result is resized down anyway.
    image.draft("L", (size, size))
    return to_grey(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)


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
