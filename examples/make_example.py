"""Draw the shipped example image examples/input.png (256x256 RGB landscape).

A procedural scene (sky gradient, sun, two rows of hills) so the repository ships a
recognisable input without any licensed photo. Run: python examples/make_example.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 256


def _lerp(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    """Blend two RGB colours; t=0 gives a, t=1 gives b."""
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def draw_scene(size: int = SIZE) -> Image.Image:
    """Sky fading from deep blue to pale orange, a sun disk, far and near hills."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for y in range(size):
        draw.line([(0, y), (size, y)], fill=_lerp((40, 90, 180), (250, 200, 150), y / (size - 1)))

    sun_x, sun_y, sun_r = int(size * 0.7), int(size * 0.35), size // 10
    draw.ellipse([sun_x - sun_r, sun_y - sun_r, sun_x + sun_r, sun_y + sun_r], fill=(255, 230, 120))

    far = [(0, int(size * 0.62)), (size // 4, int(size * 0.5)), (size // 2, int(size * 0.6)),
           (int(size * 0.8), int(size * 0.48)), (size, int(size * 0.58)), (size, size), (0, size)]
    draw.polygon(far, fill=(70, 120, 90))
    diameter = size * 1.8
    for left, top, colour in ((-0.3, 0.68, (60, 150, 60)), (0.45, 0.78, (40, 120, 45))):
        x0, y0 = size * left, size * top
        draw.ellipse([x0, y0, x0 + diameter, y0 + diameter], fill=colour)
    return image


def main() -> None:
    out = Path(__file__).with_name("input.png")
    draw_scene().save(out)
    print(out)


if __name__ == "__main__":
    main()
