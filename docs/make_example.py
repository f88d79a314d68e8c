"""Writes docs/example.png, the picture the README's check command edits: a small procedurally drawn scene.

Deterministic and download-free (numpy + Pillow only), so a fresh clone can run the check as written:

    python docs/make_example.py            # rewrites docs/example.png
    python docs/make_example.py OUT.png    # or anywhere else
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 512


def sky(size: int) -> Image.Image:
    """A vertical day-sky gradient; each row is one colour, which PNG's filters compress to almost nothing."""
    t = np.linspace(0.0, 1.0, size)[:, None]
    top, horizon = np.array([70, 130, 210]), np.array([200, 225, 245])
    rows = np.round(top + (horizon - top) * t).astype(np.uint8)  # [size, 3]
    return Image.fromarray(np.repeat(rows[:, None, :], size, axis=1))


def scene(size: int = SIZE) -> Image.Image:
    img = sky(size)
    d = ImageDraw.Draw(img)
    s = size / 512  # every coordinate below is drawn for 512 px and scaled

    def box(*xy: float) -> list[int]:
        return [round(v * s) for v in xy]

    d.ellipse(box(370, 50, 450, 130), fill=(255, 214, 90))  # sun
    d.ellipse(box(-120, 300, 300, 620), fill=(90, 160, 80))  # far hill
    d.ellipse(box(180, 330, 680, 700), fill=(70, 140, 60))  # near hill
    d.rectangle(box(0, 440, 512, 512), fill=(60, 120, 50))  # meadow
    d.rectangle(box(150, 300, 290, 420), fill=(225, 205, 170))  # house
    d.polygon(box(135, 305, 220, 230, 305, 305), fill=(170, 60, 50))  # roof
    d.rectangle(box(200, 350, 240, 420), fill=(110, 70, 40))  # door
    d.rectangle(box(165, 320, 190, 345), fill=(150, 200, 235))  # window
    d.rectangle(box(250, 320, 275, 345), fill=(150, 200, 235))
    d.rectangle(box(370, 330, 384, 430), fill=(100, 70, 40))  # tree trunk
    d.ellipse(box(330, 250, 425, 350), fill=(40, 110, 45))  # tree crown
    return img


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent / "example.png"
    scene().save(out, optimize=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
