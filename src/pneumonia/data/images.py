"""Image decoding and resizing shared by the TFRecords writer and prediction, so a model sees
new images exactly as it saw its training images."""

import io

from PIL import Image


def load_resized(source: bytes | str, size: int) -> Image.Image:
    """Decode a JPEG/PNG (grayscale or colour, any size) to a `size` x `size` grayscale image.

    Chest X-rays carry no colour information; the few RGB files in the Kaggle set are grey too.
    """
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    # JPEG draft mode decodes at a reduced scale directly: several times faster on the
    # ~2000 px originals, and the result is resized down anyway.
    image.draft("L", (size, size))
    image = image.convert("L")
    return image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)


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
