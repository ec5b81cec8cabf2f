"""DICOM chest X-rays as the 8-bit greyscale the training images are (pneumonia.data.images reads them).

pydicom reads the file and decodes its pixels (compressed transfer syntaxes: RLE by pydicom itself,
JPEG baseline by Pillow, JPEG lossless, extended and JPEG-LS by python-gdcm, JPEG 2000 and HTJ2K by
pylibjpeg-openjpeg). The stored values then go through the modality LUT (rescale slope and
intercept, or a Modality LUT Sequence), the first VOI LUT or window in the file, an inversion for
MONOCHROME1 (white is air), and a linear scaling of the range those steps can produce over every
value the stored bits hold to 0..255. So an 8-bit MONOCHROME2 file with nothing else set is its
pixels unchanged (docs/data.md, "DICOM").

Only pixel attributes are read: no header value (patient, dates, institution) goes into a message,
and pydicom's checks of header values, whose warnings quote the values, are off.
"""

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pneumonia.errors import PipelineError

MAGIC_OFFSET, MAGIC = 128, b"DICM"  # a DICOM file: a 128-byte preamble, then "DICM" (PS3.10 7.1)
X_RAY_MODALITIES = ("CR", "DX")  # computed and digital radiography
MAX_BITS_STORED = 16  # every CR/DX image; the value-to-grey table has 2**BitsStored entries
# The package a compressed transfer syntax needs, when pydicom finds no decoder installed for it.
DECODER_PACKAGES = {
    **dict.fromkeys(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                     "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"), "python-gdcm"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                     "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"), "pylibjpeg pylibjpeg-openjpeg"),
}


class DicomError(PipelineError):
    """A DICOM file that is not a single greyscale X-ray this reader can decode: the message says why."""


def is_dicom(source: bytes | str | Path | BinaryIO) -> bool:
    """Whether `source` (a file's bytes, its path or an open binary file) is DICOM by its content."""
    if isinstance(source, bytes):
        head = source[:MAGIC_OFFSET + len(MAGIC)]
    elif isinstance(source, str | Path):
        if not Path(source).is_file():  # a FIFO would block the read until something writes to it
            return False
        try:
            with open(source, "rb") as file:
                head = file.read(MAGIC_OFFSET + len(MAGIC))
        except OSError:  # not a file this process can read: not taken as DICOM (opening it will say why)
            return False
    else:
        head = source.read(MAGIC_OFFSET + len(MAGIC))
    return head[MAGIC_OFFSET:] == MAGIC


def _read(source: bytes | str):
    import pydicom
    from pydicom import config

    # Header values are never looked at beyond the pixel attributes; validating them only warns,
    # quoting the value (a patient's name) on stderr.
    config.settings.reading_validation_mode = config.IGNORE
    try:
        return pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception as exc:  # noqa: BLE001 - pydicom's parser raises many types for a damaged file
        # Its message is not shown: for a damaged header it may quote header values.
        raise DicomError(f"not a readable DICOM file ({type(exc).__name__} while reading its header): "
                         "the file may be truncated or damaged; export it again") from None


def _check(dataset) -> None:
    """A single-frame greyscale CR/DX image with integer pixel data, else a DicomError saying what it is."""
    if "PixelData" not in dataset:
        raise DicomError("the DICOM file holds no (integer) Pixel Data: not an image (a report, a structured "
                         "document or a presentation state?), or a file cut short; send the whole image file")
    modality = str(dataset.get("Modality", "") or "none")
    if modality not in X_RAY_MODALITIES:
        raise DicomError(f"the DICOM file's modality is {modality!r}, not an X-ray ({' or '.join(X_RAY_MODALITIES)}):"
                         " this model reads chest radiographs only")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"the DICOM file holds {frames} frames: send single-frame images (one radiograph a file)")
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"the DICOM image is {photometric or 'of no photometric interpretation'} with {samples} "
                         "sample(s) a pixel, not greyscale (MONOCHROME1 or MONOCHROME2): not a radiograph")
    bits = int(dataset.get("BitsStored", 0) or 0)
    if not 1 <= bits <= MAX_BITS_STORED:
        raise DicomError(f"the DICOM image stores {bits} bits a pixel; radiographs store 1 to {MAX_BITS_STORED}")


def _check_decoder(dataset) -> None:
    from pydicom.pixels import get_decoder

    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise DicomError("the DICOM file has no transfer syntax in its file meta information: export it again")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomError(f"the DICOM file's transfer syntax {syntax.name} ({syntax}) is not one pydicom decodes: "
                         "export the image uncompressed, or as JPEG, JPEG 2000 or RLE") from None
    if not decoder.is_available:
        package = DECODER_PACKAGES.get(str(syntax), " ".join(decoder.missing_dependencies) or "a decoder plugin")
        raise DicomError(f"the DICOM file is compressed as {syntax.name} and no decoder for it is installed: "
                         f"`pip install {package}` (docs/data.md, DICOM)")


def _grey_table(dataset, signed: bool, bits: int) -> tuple[np.ndarray, int]:
    """(table, lowest stored value): the 8-bit grey of every value the stored bits can hold."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    values = np.arange(low, high + 1, dtype=np.int32 if signed else np.uint32)
    try:
        values = apply_voi_lut(apply_modality_lut(values, dataset), dataset, index=0)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise DicomError(f"the DICOM file's modality LUT, VOI LUT or window is invalid ({exc})") from None
    values = np.asarray(values, dtype=np.float64)
    smallest, largest = float(values.min()), float(values.max())
    scaled = (values - smallest) / (largest - smallest) * 255 if largest > smallest else np.zeros_like(values)
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        scaled = 255 - scaled
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8), low


def dimensions(source: bytes | str) -> tuple[object, int, int]:
    """(dataset, width, height) of a DICOM file, read and checked, its pixels not yet decoded."""
    dataset = _read(source)
    _check(dataset)
    return dataset, int(dataset.get("Columns", 0) or 0), int(dataset.get("Rows", 0) or 0)


def grey_pixels(dataset) -> np.ndarray:
    """The 8-bit greyscale image (height, width) of a dataset `dimensions` returned."""
    _check_decoder(dataset)
    try:
        stored = dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - each decoder raises its own types
        # After the header was read, pydicom's and the decoders' messages are about bytes and lengths.
        raise DicomError(f"the DICOM file's pixel data cannot be decoded ({type(exc).__name__}: {exc}): "
                         "the file may be truncated; export it again") from None
    if stored.ndim != 2:
        raise DicomError(f"the DICOM pixel data decodes to shape {stored.shape}, not one greyscale image")
    table, low = _grey_table(dataset, bool(dataset.get("PixelRepresentation", 0)), int(dataset.BitsStored))
    index = np.clip(stored.astype(np.int32) - low, 0, len(table) - 1)  # a value past the stored bits saturates
    return table[index]
