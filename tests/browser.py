"""Open an HTML page in headless Chromium: did every image load, and is the screenshot not blank?"""

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Appended to a copy of the page: after load, the title says how many images decoded.
IMAGE_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter(image => image.complete && image.naturalWidth > 0);
  document.title = `images loaded: ${loaded.length} of ${images.length}`;
});
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        pytest.fail("Chromium is needed to check the HTML report: install it (Debian: apt-get install -y chromium)")
    return found


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=True)


def open_in_chromium(page: Path, screenshot: Path) -> tuple[int, int]:
    """(images loaded, images on the page); writes a 1200x3000 screenshot of `page` to `screenshot`."""
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "probe.html"
        probe.write_text(page.read_text().replace("</body>", IMAGE_PROBE + "</body>"))
        dom = _run(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], Path(scratch) / "profile").stdout
        _run([f"--screenshot={screenshot}", "--window-size=1200,3000", page.resolve().as_uri()],
             Path(scratch) / "profile")
    found = re.search(r"<title>images loaded: (\d+) of (\d+)</title>", dom)
    assert found, f"the page script did not run; DOM starts:\n{dom[:500]}"
    return int(found[1]), int(found[2])


def assert_not_blank(screenshot: Path) -> None:
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.shape[:2] == (3000, 1200)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 500, f"screenshot has only {len(colours)} colours: blank or nearly"
