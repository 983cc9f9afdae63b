"""Pictures of predictions: mask overlays with outlines (demo.py) and side-by-side panels (test.py)."""
import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

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


def overlay_masks(image, masks, colours=None, alpha=0.5):
    """Blend each (H, W) mask into the RGB image in its colour and draw its outline."""
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    colours = colours or mask_colours(len(masks))
    outlines = []
    for index, mask in enumerate(masks):
        colour = np.array(colours[index % len(colours)], dtype=np.float32)
        region = np.asarray(mask, dtype=bool)
        canvas[region] = (1 - alpha) * canvas[region] + alpha * colour
        mask_image = mask_to_image(region)
        # outline = the mask minus its erosion
        eroded = np.asarray(mask_image.filter(ImageFilter.MinFilter(3))) > 0
        outlines.append((region & ~eroded, colour))
    for outline, colour in outlines:
        canvas[outline] = colour
    return Image.fromarray(canvas.round().astype(np.uint8))


def draw_caption(image, lines, colours=None):
    """Write text lines in a band under the image (colour-coded when several expressions).

    The picture widens (white on the right) when a line is longer than the image is wide.
    """
    line_height = 14
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max([image.width] + [int(measure.textlength(line)) + 6 for line in lines])
    band = Image.new("RGB", (width, line_height * len(lines) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for index, line in enumerate(lines):
        colour = colours[index % len(colours)] if colours else (0, 0, 0)
        draw.text((3, 2 + index * line_height), line, fill=colour)
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
