"""DICOM files made with pydicom (and python-gdcm's encoder) from an 8-bit greyscale X-ray of the committed
sample, in each form the reader must turn back into that X-ray; nothing downloaded."""

import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import REPO_SAMPLE

# Made-up patient data: none of it may appear anywhere the project writes or prints.
PATIENT = {"PatientName": "Quixote^Zebulon^Aurelio", "PatientID": "PID-7Q3X9-31415", "PatientBirthDate": "19230517",
           "InstitutionName": "Saint Nowhere Infirmary of Elsewhere", "AccessionNumber": "ACC-8675309-ZZ",
           "StudyDate": "20191231", "ReferringPhysicianName": "Hypothetical^Hortensia"}
SECRETS = ["Quixote", "Zebulon", "PID-7Q3X9-31415", "19230517", "Saint Nowhere", "ACC-8675309", "Hortensia"]

# form: (transfer syntax, whether decoding gives back the stored values exactly)
FORMS = {
    "mono2_8bit": ("1.2.840.10008.1.2.1", True),
    "mono1_12bit_rescaled": ("1.2.840.10008.1.2.1", True),
    "window_16bit": ("1.2.840.10008.1.2.1", True),
    "deflated": ("1.2.840.10008.1.2.1.99", True),  # pydicom's own
    "rle": ("1.2.840.10008.1.2.5", True),  # pydicom's own RLE
    "jpeg2000_lossless": ("1.2.840.10008.1.2.4.90", True),  # pylibjpeg-openjpeg
    "jpeg_lossless": ("1.2.840.10008.1.2.4.70", True),  # python-gdcm
    "jpeg_lossless_p14": ("1.2.840.10008.1.2.4.57", True),  # python-gdcm
    "jpegls_lossless": ("1.2.840.10008.1.2.4.80", True),  # python-gdcm
    "jpeg_baseline": ("1.2.840.10008.1.2.4.50", False),  # a JPEG: compared with its own decoded pixels
}
WINDOW = {"WindowCenter": 13750.5, "WindowWidth": 25501}  # maps 1000 + 100 * v back to v (v: 0..255)


def sample_xrays(count: int, width: int = 256) -> list[tuple[str, np.ndarray]]:
    """(name, 8-bit grey pixels) of the first `count` test X-rays of the committed sample, `width` px wide."""
    with zipfile.ZipFile(REPO_SAMPLE) as archive:
        names = sorted(name for name in archive.namelist() if "/test/" in name and name.endswith(".jpeg"))
        normal, pneumonia = ([name for name in names if f"/{label}/" in name] for label in ("NORMAL", "PNEUMONIA"))
        xrays = []
        for name in normal[:count // 2] + pneumonia[:count - count // 2]:
            image = Image.open(io.BytesIO(archive.read(name))).convert("L")
            image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.BILINEAR)
            xrays.append((Path(name).stem, np.asarray(image)))
    return xrays


def png_bytes(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    return buffer.getvalue()


def dataset(stored: np.ndarray, bits: int, photometric: str = "MONOCHROME2", modality: str = "DX", **attributes):
    """An uncompressed single-frame DICOM dataset of `stored` values."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.update(PATIENT)
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits == 8 else 16), bits, bits - 1, 0
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.PixelData = stored.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    return ds


def file_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def gdcm_compressed(ds, syntax: str) -> bytes:
    """`ds` re-encoded by python-gdcm (pydicom has no JPEG lossless or JPEG-LS encoder of its own)."""
    import gdcm

    syntaxes = {"1.2.840.10008.1.2.4.51": gdcm.TransferSyntax.JPEGExtendedProcess2_4,  # 12-bit lossy JPEG
                "1.2.840.10008.1.2.4.70": gdcm.TransferSyntax.JPEGLosslessProcess14_1,
                "1.2.840.10008.1.2.4.57": gdcm.TransferSyntax.JPEGLosslessProcess14,
                "1.2.840.10008.1.2.4.80": gdcm.TransferSyntax.JPEGLSLossless}
    with tempfile.TemporaryDirectory() as scratch:
        source, target = Path(scratch) / "in.dcm", Path(scratch) / "out.dcm"
        source.write_bytes(file_bytes(ds))
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(syntaxes[syntax]))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(target))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        return target.read_bytes()


def dicom_file(grey: np.ndarray, form: str) -> tuple[bytes, np.ndarray]:
    """(DICOM file, the 8-bit grey image it holds): `grey` itself, except for a lossy JPEG's decoded pixels."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, RLELossless

    value = grey.astype(np.float64)
    mono1 = dataset(np.rint((255 - value) * 4095 / 255), 12, "MONOCHROME1", RescaleSlope=0.5, RescaleIntercept=-1024)
    windowed = dataset(1000 + 100 * value, 16, **WINDOW)
    if form == "mono2_8bit":
        return file_bytes(dataset(grey, 8)), grey
    if form == "mono1_12bit_rescaled":
        return file_bytes(mono1), grey
    if form == "window_16bit":
        return file_bytes(windowed), grey
    if form == "deflated":
        mono1.file_meta.TransferSyntaxUID = FORMS[form][0]  # pydicom deflates the dataset as it writes it
        return file_bytes(mono1), grey
    if form == "rle":
        windowed.compress(RLELossless)
        return file_bytes(windowed), grey
    if form == "jpeg2000_lossless":
        mono1.compress(JPEG2000Lossless)
        return file_bytes(mono1), grey
    if form in ("jpeg_lossless", "jpeg_lossless_p14", "jpegls_lossless"):
        return gdcm_compressed(windowed, FORMS[form][0]), grey
    if form == "jpeg_baseline":
        buffer = io.BytesIO()
        Image.fromarray(grey).save(buffer, format="JPEG", quality=95)
        ds = dataset(grey, 8)
        ds.file_meta.TransferSyntaxUID = FORMS[form][0]
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        return file_bytes(ds), np.asarray(Image.open(buffer).convert("L"))
    raise ValueError(form)


def _encapsulated(syntax: str, frames: list[bytes], rows: int = 100):
    """A `rows` x `rows` 8-bit DX dataset (one frame by its header) whose pixel data is the compressed
    `frames` (whatever their own size), with a basic offset table."""
    from pydicom.encaps import encapsulate

    ds = dataset(np.zeros((1, 1), np.uint8), 8, Rows=rows, Columns=rows)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    return ds


def jpeg_bomb(side: int, rows: int = 100, frames: int = 1) -> bytes:
    """A DICOM of a `rows` x `rows` header holding `frames` JPEGs of 1 KB whose frame header (SOF0) says `side`
    x `side`: the decoder allocates that, filling what the scan lacks."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buffer, format="JPEG")
    jpeg = bytearray(buffer.getvalue())
    sof = jpeg.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    jpeg[sof + 5:sof + 9] = side.to_bytes(2, "big") * 2
    return file_bytes(_encapsulated("1.2.840.10008.1.2.4.50", [bytes(jpeg)] * frames, rows))


def j2k_bomb(side: int) -> bytes:
    """A 1 KB DICOM of a 100 x 100 header holding a JPEG 2000 codestream whose SIZ marker says `side` x `side`."""
    import openjpeg

    codestream = bytearray(openjpeg.encode(np.zeros((64, 64), np.uint8), codec_format=0))
    siz = codestream.index(b"\xff\x51")  # marker, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz (15444-1 A.5.1)
    codestream[siz + 6:siz + 14] = side.to_bytes(4, "big") * 2  # the image
    codestream[siz + 22:siz + 30] = side.to_bytes(4, "big") * 2  # one tile of it
    return file_bytes(_encapsulated("1.2.840.10008.1.2.4.90", [bytes(codestream)]))


def rle_bomb(decoded: int) -> bytes:
    """An RLE DICOM of a 100 x 100 header (8-bit: one segment) whose segment's PackBits runs each repeat a
    byte 128 times (2 bytes each): it decodes to `decoded` bytes, from a file of 1/64 of that."""
    import struct

    header = struct.pack("<16L", 1, 64, *[0] * 14)  # one segment, at offset 64
    return file_bytes(_encapsulated("1.2.840.10008.1.2.5", [header + b"\x81\x00" * (decoded // 128)]))


def deflate_bomb(inflated: int) -> bytes:
    """A deflated DICOM of a 100 x 100 image whose dataset inflates to `inflated` bytes and more (trailing
    padding, (FFFC,FFFC), of zeros), deflated in a stream: making it costs no more memory than a chunk."""
    import struct
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = dataset(np.zeros((100, 100), np.uint8), 8)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    meta, body = DicomBytesIO(), DicomBytesIO()
    meta.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta)
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = 2**24
    parts = [meta.getvalue(), deflater.compress(body.getvalue() + b"\xfc\xff\xfc\xffOB\0\0" +
                                                struct.pack("<I", inflated // chunk * chunk))]
    parts += [deflater.compress(bytes(chunk)) for _ in range(inflated // chunk)]
    return b"".join([*parts, deflater.flush()])


def bare_dataset(ds) -> bytes:
    """`ds` as an old ACR-NEMA export writes it: the dataset alone, implicit VR little endian, with no
    128-byte preamble, no "DICM" and no file meta information."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    return buffer.getvalue()
