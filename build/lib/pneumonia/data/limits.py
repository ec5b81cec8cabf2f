"""What one input image may cost, checked before its pixels are decoded (pneumonia.data.images, .dicom)."""

# Refused before decoding: 6000 x 6000, over 4x the largest chest radiographs (a 43 cm detector at
# 100 um is 4300 px). PIL alone only warns up to 179 MP, and a 10000 x 10000 PNG of 380 KiB
# decodes to ~0.5 GB.
MAX_PIXELS = 36_000_000
# A deflated DICOM dataset is inflated whole before its header can be read: at most the pixels of
# MAX_PIXELS at 16 bits and this much of header beside them (pneumonia.data.dicom).
MAX_HEADER_BYTES = 8 * 2**20
MAX_INFLATED_BYTES = MAX_PIXELS * 2 + MAX_HEADER_BYTES


class ImageTooLarge(ValueError):
    pass


def check_size(width: int, height: int, what: str = "") -> None:
    """An ImageTooLarge over MAX_PIXELS; `what` says whose size it is (e.g. "its JPEG 2000 codestream")."""
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{width} x {height} = {width * height / 1e6:.0f} megapixels{what and ' ' + what}, "
                            f"more than the {MAX_PIXELS / 1e6:.0f} megapixel limit: downscale the image first")
