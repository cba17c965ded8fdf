"""Draw the sample source images in data/images/ (committed; rerun only to change them).

Each is drawn from shapes with Pillow (no downloads, no randomness), sized within the model's limits
(each side 360-2000 px) and kept small (< 200 KB) so the repository stays light.

    python scripts/draw_sample_images.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

Color = tuple[int, int, int]


def vertical_gradient(size: tuple[int, int], top: Color, bottom: Color) -> Image.Image:
    """Rows of one colour each: smooth to the eye, cheap to compress."""
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / (height - 1)
        draw.line([(0, y), (width, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    return image


def draw_mug() -> Image.Image:
    image = vertical_gradient((640, 480), (250, 226, 190), (214, 170, 120))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 360, 640, 480], fill=(120, 82, 52))  # table
    draw.ellipse([190, 385, 450, 425], fill=(96, 64, 40))  # shadow
    draw.rounded_rectangle([220, 220, 400, 400], radius=24, fill=(48, 96, 150))  # body
    draw.ellipse([220, 205, 400, 240], fill=(36, 74, 120))  # rim
    draw.ellipse([232, 211, 388, 234], fill=(70, 44, 26))  # coffee
    draw.ellipse([380, 255, 460, 345], outline=(48, 96, 150), width=18)  # handle
    for x in (270, 310, 350):  # steam
        draw.arc([x - 20, 120, x + 20, 170], 90, 270, fill=(255, 255, 255), width=5)
        draw.arc([x - 20, 160, x + 20, 210], 270, 90, fill=(255, 255, 255), width=5)
    return image


def draw_lighthouse() -> Image.Image:
    image = vertical_gradient((480, 640), (40, 60, 120), (245, 170, 110))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 470, 480, 640], fill=(30, 70, 110))  # sea
    for y in range(485, 640, 22):  # waves
        draw.line([(20 + (y % 3) * 30, y), (460, y)], fill=(70, 120, 160), width=3)
    draw.polygon([(150, 640), (200, 500), (330, 490), (400, 640)], fill=(60, 55, 50))  # rocks
    draw.polygon([(215, 500), (235, 200), (285, 200), (305, 500)], fill=(240, 236, 228))  # tower
    for top in (260, 360, 440):  # red bands
        left, right = 235 - (top - 200) * 20 // 300, 285 + (top - 200) * 20 // 300
        draw.rectangle([left, top, right, top + 35], fill=(190, 40, 40))
    draw.rectangle([228, 160, 292, 200], fill=(255, 230, 120))  # lantern
    draw.polygon([(220, 160), (260, 120), (300, 160)], fill=(50, 40, 40))  # roof
    draw.polygon([(292, 170), (480, 110), (480, 230)], fill=(255, 240, 170))  # beam
    return image


def draw_still_life() -> Image.Image:
    image = vertical_gradient((600, 600), (235, 235, 228), (190, 196, 205))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 430, 600, 600], fill=(160, 150, 140))  # shelf
    draw.polygon([(80, 430), (80, 290), (180, 250), (280, 290), (280, 430), (180, 470)], fill=(90, 130, 180))
    draw.polygon([(80, 290), (180, 250), (280, 290), (180, 330)], fill=(140, 180, 220))  # cube top
    draw.polygon([(180, 330), (280, 290), (280, 430), (180, 470)], fill=(60, 95, 140))  # cube side
    for radius, shade in ((90, (200, 80, 60)), (70, (220, 110, 80)), (45, (240, 150, 110)), (20, (255, 200, 170))):
        offset = (90 - radius) // 3
        draw.ellipse([400 - radius - offset, 340 - radius - offset, 400 + radius - offset, 340 + radius - offset],
                     fill=shade)  # sphere, lit from the top left
    draw.polygon([(300, 440), (350, 200), (400, 440)], fill=(230, 190, 70))  # cone
    draw.ellipse([300, 425, 400, 455], fill=(200, 160, 50))
    return image


SAMPLES = {"mug.png": draw_mug, "lighthouse.jpg": draw_lighthouse, "still_life.png": draw_still_life}


def main(output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in SAMPLES.items():
        path = output_dir / name
        options = {"quality": 88} if path.suffix == ".jpg" else {"optimize": True}
        draw().save(path, **options)
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "data" / "images")
