"""Pictures: captions fit, overlays colour exactly the masked pixels."""
import numpy as np
import pytest
from PIL import Image

from refer.toy import PALETTE as TOY_PALETTE
from utils.visualize import (CAPTION_MAX_WIDTH, PALETTE, _lab, contrasting_colours, draw_caption, outline_shade,
                             overlay_masks)


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
    inside = np.zeros_like(mask)
    inside[7:13, 7:13] = True  # within the two-pixel edge
    assert (result[inside][:, 0] > 200).all() and (result[inside][:, 1] < 200).all()
    assert tuple(result[5, 5]) == outline_shade((255, 0, 0)) == (255, 255, 255)  # the edge: white on red
    assert tuple(result[6, 6]) == (255, 0, 0)  # inside it, a ring of the mask's colour


def test_caption_cuts_a_line_longer_than_its_widest():
    wide = draw_caption(Image.new("RGB", (40, 30)), ["word " * 2000])  # a 10,000-character line
    assert wide.size == (CAPTION_MAX_WIDTH, 30 + 14 + 4)  # one line, cut (was 43003 px wide)
    photo = draw_caption(Image.new("RGB", (900, 30)), ["word " * 2000])
    assert photo.width == 900


@pytest.mark.parametrize("name", ["red", "green", "blue", "yellow"])
def test_a_mask_stands_out_on_each_toy_colour(name):
    """The mask's colour is chosen against the pixels under it, and its edge is black or white next to
    that colour: on each of the toy's shapes the fill, the colour ring and the edge differ clearly
    (CIELAB distance) from the shape and from each other. Drawn in the first palette colour, as
    before, a mask on the red shape changed it by less than 10."""
    obj = TOY_PALETTE[name]
    pixels = np.full((40, 40, 3), 190, np.uint8)
    pixels[8:32, 8:32] = obj
    mask = np.zeros((40, 40), bool)
    mask[8:32, 8:32] = True
    image = Image.fromarray(pixels)
    (colour,) = contrasting_colours(image, [mask])
    drawn = np.asarray(overlay_masks(image, [mask], colours=[colour]))
    fill, ring, edge = drawn[20, 20], drawn[9, 20], drawn[8, 20]
    assert tuple(ring) == colour and tuple(edge) == outline_shade(colour)

    def distance(a, b):
        return float(np.linalg.norm(_lab(a) - _lab(b)))

    assert distance(fill, obj) > 25 and distance(ring, obj) > 50 and distance(edge, ring) > 50
    if name == "red":
        old = np.asarray(overlay_masks(image, [mask], colours=[PALETTE[0]]))[20, 20]
        assert distance(old, obj) < 10
