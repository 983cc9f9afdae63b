"""Pictures of predictions: mask overlays with outlines (demo.py) and side-by-side panels (test.py)."""
import colorsys

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

# Distinct colours for several expressions drawn on one image (the first eight; see mask_colours).
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60)]
_GOLDEN_RATIO = 0.618033988749895


def mask_colours(count):
    """`count` distinct RGB colours: PALETTE first, then hues spread by the golden ratio (so the
    9th and later expressions get colours of their own instead of reusing the first ones)."""
    colours = list(PALETTE[:count])
    hue = 0.11
    while len(colours) < count:
        hue = (hue + _GOLDEN_RATIO) % 1.0
        lightness = (0.45, 0.6, 0.35)[(len(colours) // 8) % 3]
        rgb = tuple(int(round(255 * c)) for c in colorsys.hls_to_rgb(hue, lightness, 0.85))
        if rgb not in colours:
            colours.append(rgb)
    return colours


def tensor_to_image(image):
    """A (3, H, W) tensor normalised to [-1, 1] -> an RGB PIL image."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def mask_to_image(mask):
    """A (H, W) {0,1} mask -> an L-mode PIL image with 0/255."""
    return Image.fromarray((np.asarray(mask, dtype=np.uint8) > 0).astype(np.uint8) * 255)


def _lab(rgb):
    """sRGB values (..., 3) in 0-255 -> CIELAB (D65), for colour distances as the eye sees them."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    xyz = xyz / np.array([0.9505, 1.0, 1.089])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


# Colour statistics are taken on at most this many pixels of an image (a regular subsample).
_STATISTICS_PIXELS = 1 << 18


def contrasting_colours(image, masks):
    """One colour per mask, each as far (CIELAB distance) from the mean colour of the pixels under
    its mask as any still unused: a red mask on a red object is not drawn in red. Distinct colours
    (from PALETTE, then mask_colours' further hues); deterministic for the same image and masks."""
    step = max(1, int(np.sqrt(image.width * image.height / _STATISTICS_PIXELS)))
    size = (max(1, image.width // step), max(1, image.height // step))
    sample = np.asarray(image.convert("RGB").resize(size, Image.NEAREST)) if step > 1 else np.asarray(image.convert("RGB"))
    candidates = mask_colours(len(masks) + len(PALETTE))
    lab = _lab(candidates)
    chosen = []
    for mask in masks:
        picked = np.asarray(mask_to_image(mask).resize(size, Image.NEAREST)) > 0 if step > 1 else np.asarray(mask, bool)
        under = sample[picked]
        mean = (under if len(under) else sample.reshape(-1, 3)).mean(axis=0)
        distance = np.linalg.norm(lab - _lab(mean), axis=1)
        distance[[candidates.index(colour) for colour in chosen]] = -1.0
        chosen.append(candidates[int(np.argmax(distance))])
    return chosen


def outline_shade(colour):
    """Black or white, whichever stands out more against `colour`: the mask's edge is drawn in
    both, so it shows on any object and any background."""
    return (0, 0, 0) if _lab(colour)[0] > 55 else (255, 255, 255)


def overlay_masks(image, masks, colours=None, alpha=0.5):
    """Blend each (H, W) mask into the RGB image in its colour and draw its edge: the outermost
    pixels of the mask in black or white (`outline_shade`), the ring inside them in the mask's
    colour. Only the masks' pixels change. 8-bit PIL operations on each mask's bounding box (and
    two pixels around it), so a large image costs a few copies of the masked part, not float arrays
    of the whole."""
    canvas = image.convert("RGB")
    colours = colours or mask_colours(len(masks))
    edges = []
    for index, mask in enumerate(masks):
        colour = tuple(int(c) for c in colours[index % len(colours)])
        region = mask_to_image(mask)
        box = region.getbbox()
        if box is None:
            continue
        # Two pixels of background around the mask: its erosion there is the whole image's.
        box = (max(box[0] - 2, 0), max(box[1] - 2, 0), min(box[2] + 2, canvas.width), min(box[3] + 2, canvas.height))
        region = region.crop(box)
        tinted = Image.blend(canvas.crop(box), Image.new("RGB", region.size, colour), alpha)
        canvas.paste(tinted, box[:2], mask=region)
        inner = region.filter(ImageFilter.MinFilter(3))  # the mask less its outermost pixels
        edge = ImageChops.subtract(region, inner)
        ring = ImageChops.subtract(inner, inner.filter(ImageFilter.MinFilter(3)))
        edges.append((edge, ring, colour, box[:2]))
    for edge, ring, colour, corner in edges:  # after every fill, so no blend covers another's edge
        canvas.paste(outline_shade(colour), corner, mask=edge)
        canvas.paste(colour, corner, mask=ring)
    return canvas


# Captions wider than this are cut (an ellipsis ends a cut line), unless the image is wider.
CAPTION_MAX_WIDTH = 640
_LINE_HEIGHT = 14
_SWATCH = 10  # the square of a line's colour before its text


def _fit(draw, text, width):
    """`text`, cut with an ellipsis so it takes at most `width` pixels."""
    if draw.textlength(text) <= width:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits with the ellipsis
        middle = (low + high + 1) // 2
        if draw.textlength(text[:middle] + "…") <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low] + "…"


def draw_caption(image, lines, colours=None, max_width=CAPTION_MAX_WIDTH):
    """Write text lines in a band under the image; with `colours`, each line starts with a square
    of its colour (the legend of an overlay).

    The picture widens (white on the right) when a line is longer than the image is wide, up to
    `max_width`; a line longer than that is cut, ending in an ellipsis.
    """
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    indent = _SWATCH + 4 if colours else 0
    needed = max([0] + [int(measure.textlength(line[:2000])) for line in lines]) + indent + 6
    width = max(image.width, min(needed, max_width))
    lines = [_fit(measure, line, width - indent - 6) for line in lines]
    band = Image.new("RGB", (width, _LINE_HEIGHT * len(lines) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for index, line in enumerate(lines):
        top = 2 + index * _LINE_HEIGHT
        if colours:
            colour = tuple(colours[index % len(colours)])
            draw.rectangle((3, top + 1, 3 + _SWATCH - 1, top + _SWATCH), fill=colour, outline=(0, 0, 0))
        draw.text((3 + indent, top), line, fill=(0, 0, 0))
    result = Image.new("RGB", (width, image.height + band.height), (255, 255, 255))
    result.paste(image, (0, 0))
    result.paste(band, (0, image.height))
    return result


# Panel colours chosen away from the toy dataset's object colours.
TRUTH_COLOUR, PREDICTION_COLOUR = (0, 220, 255), (255, 140, 0)
MIN_PANEL_WIDTH = 160  # small evaluated images are enlarged so the caption fits


def comparison_panel(image, target, prediction, sentence, iou):
    """image | ground truth | prediction, with the sentence and the IoU written underneath."""
    scale = max(1, -(-MIN_PANEL_WIDTH // image.width))
    if scale > 1:  # nearest, so the masks' pixels stay visible as evaluated
        size = (image.width * scale, image.height * scale)
        image = image.resize(size, Image.NEAREST)
        target, prediction = (np.asarray(mask_to_image(m).resize(size, Image.NEAREST)) > 0
                              for m in (target, prediction))
    width, height = image.size
    panel = Image.new("RGB", (3 * width, height), (255, 255, 255))
    panel.paste(image, (0, 0))
    panel.paste(overlay_masks(image, [target], colours=[TRUTH_COLOUR]), (width, 0))
    panel.paste(overlay_masks(image, [prediction], colours=[PREDICTION_COLOUR]), (2 * width, 0))
    return draw_caption(panel, [f'"{sentence}"', f"ground truth | prediction  IoU {iou:.2f}"])
