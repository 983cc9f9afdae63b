"""Pictures: captions fit, overlays colour exactly the masked pixels."""
import numpy as np
from PIL import Image

from utils.visualize import draw_caption, overlay_masks


def test_caption_widens_the_picture_only_when_a_line_is_longer_than_it():
    image = Image.new("RGB", (40, 30), (10, 20, 30))
    wide = draw_caption(image, ["a sentence far longer than forty pixels"])
    assert wide.width > 40 and wide.height > 30
    assert wide.getpixel((39, 0)) == (10, 20, 30) and wide.getpixel((wide.width - 1, 0)) == (255, 255, 255)
    narrow = draw_caption(Image.new("RGB", (400, 30)), ["short"])
    assert narrow.width == 400


def test_overlay_changes_only_the_masked_pixels():
    image = Image.new("RGB", (20, 20), (200, 200, 200))
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:15, 5:15] = True
    result = np.asarray(overlay_masks(image, [mask], colours=[(255, 0, 0)]))
    assert (result[~mask] == 200).all()
    assert (result[mask][:, 0] > 200).all() and (result[mask][:, 1] < 200).all()
    assert tuple(result[5, 5]) == (255, 0, 0)  # the outline is drawn in the mask's colour
