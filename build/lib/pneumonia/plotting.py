"""Figures as PNG files: matplotlib without a display (servers, CI), each figure written atomically.

Take `plt` from here rather than importing matplotlib.pyplot: the backend is chosen before pyplot loads.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from pneumonia.atomic import atomic_path  # noqa: E402

__all__ = ["plt", "save_png"]


def save_png(figure: matplotlib.figure.Figure, path: Path, tight: bool = True) -> None:
    """`figure` written to `path` as a 100 dpi PNG, atomically, then closed; `tight`: cropped to what is drawn."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight" if tight else None)
    plt.close(figure)
