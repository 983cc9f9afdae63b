"""Drawing a toy scene: a plain or mildly shaded pale background, the shapes with 2x supersampled
edges, sometimes mild sensor noise; saved as JPEG."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["JPEG_QUALITY", "render_image", "save_jpeg"]

JPEG_QUALITY = 95


def render_image(width: int, height: int, objects: list[dict], rng: np.random.Generator) -> Image.Image:
    """The scene's picture (RGB, width x height)."""
    base = rng.integers(185, 236) + rng.integers(-8, 9, size=3)
    bg = np.broadcast_to(base.astype(np.float32), (height, width, 3)).copy()
    if rng.random() < 0.3:    # gentle linear shading
        gx, gy = rng.uniform(-12, 12, size=2)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        bg += (gx * (xx / width - 0.5) + gy * (yy / height - 0.5))[..., None]
    ss = 2
    img = Image.new("RGB", (width * ss, height * ss), (0, 0, 0))
    alpha = Image.new("L", (width * ss, height * ss), 0)
    draw, adraw = ImageDraw.Draw(img), ImageDraw.Draw(alpha)
    for o in objects:
        pts = [(float(x) * ss, float(y) * ss) for x, y in o["poly"]]
        draw.polygon(pts, fill=o["rgb"])
        adraw.polygon(pts, fill=255)
    fg = np.asarray(img.resize((width, height), Image.BOX), dtype=np.float32)
    a = np.asarray(alpha.resize((width, height), Image.BOX), dtype=np.float32)[..., None] / 255
    # fg is premultiplied by coverage (black canvas), so composite accordingly.
    out = fg + (1 - a) * bg
    if rng.random() < 0.5:    # mild sensor noise
        out += rng.normal(0, rng.uniform(2, 7), size=out.shape)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def save_jpeg(image: Image.Image, path: str) -> None:
    """The toy's JPEG settings (quality 95, no chroma subsampling)."""
    image.save(path, "JPEG", quality=JPEG_QUALITY, subsampling=0)
