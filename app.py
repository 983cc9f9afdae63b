"""Try a referring segmenter in the browser: upload an image, type expressions, see the masks.

    python app.py                                         # checkpoints/model_best_toy.pth
    python app.py --checkpoint checkpoints/model_best_refcoco.pth --sd_path ./stable-diffusion-v1-5
    python app.py --checkpoint my_model/ --port 7861 --examples street.jpg "kitchen.jpg=the kettle"

A Gradio app over the inference API (engine/inference.py): the model is loaded once per process
and requests are queued, one at a time, each bounded (--max_pixels, --max_expressions,
--max_request_pixels) so that no request holds the queue for long. Each expression (one per line)
gets its mask in a colour chosen against the pixels under it, edged in black or white, a legend
with the mask's share of the image, and a download (a PNG, or a zip of PNGs for several). The
result is shown larger than the input (small images enlarged). Works offline.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import socket
import sys
import tempfile
import time
import zipfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reports

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from data.transforms import ImageTooLargeError, image_size  # noqa: E402
from engine.args import get_parser, parse_args, positive_int  # noqa: E402
from engine.inference import ReferringSegmenter, to_rgb_image  # noqa: E402
from utils.errors import InputError, one_line  # noqa: E402
from utils.io import file_in_folder  # noqa: E402
from utils.logging import run_cli  # noqa: E402
from utils.paths import DEFAULT_OUTPUT_DIR, REPO_ROOT  # noqa: E402
from utils.visualize import contrasting_colours, mask_to_image  # noqa: E402

DEFAULT_CHECKPOINT = os.path.join(DEFAULT_OUTPUT_DIR, "model_best_toy.pth")
TRAIN_TOY_COMMAND = "bash train.sh toy ./logs/toy 1"
EXAMPLES_DIR = os.path.join(REPO_ROOT, "docs", "examples")
EXAMPLE_EXPRESSIONS = os.path.join(EXAMPLES_DIR, "expressions.json")  # bundled image -> an expression
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_EXPRESSIONS = 16
# Pixels x expressions of one request: the masks' upsampling, drawing and PNGs grow with it (a
# 4096 x 4096 image with 50 expressions held the queue for 154 s on 2 CPU cores).
DEFAULT_MAX_REQUEST_PIXELS = 4 * 4096 * 4096
DISPLAY_SIZE = 512  # a smaller image is shown enlarged (whole times, nearest) to about this size


class AppModel:
    """The model the app serves, or why there is none."""

    def __init__(self, segmenter=None, label="", missing=""):
        self.segmenter, self.label, self.missing = segmenter, label, missing


class Limits:
    """What one request may ask for (--max_pixels, --max_expressions, --max_request_pixels)."""

    def __init__(self, pixels=DEFAULT_MAX_PIXELS, expressions=DEFAULT_MAX_EXPRESSIONS,
                 request_pixels=DEFAULT_MAX_REQUEST_PIXELS):
        self.pixels, self.expressions, self.request_pixels = pixels, expressions, request_pixels


def image_input(**options) -> gr.Image:
    """The one image input (upload, paste or drop; it shows the picture): Gradio's Image, whose
    upload reaches `segment` even when PIL cannot open it, so the page says why in this app's words
    (not an image, too large) instead of Gradio's error. (An instance's preprocess is replaced: a
    subclass of a Gradio component makes Gradio write a .pyi file beside this one.)"""
    image = gr.Image(**options)
    opened = image.preprocess

    def preprocess(payload):
        try:
            return opened(payload)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None if payload is None else payload.path

    image.preprocess = preprocess
    return image


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "expression"


def not_an_image(path):
    return f"{html.escape(os.path.basename(path))} is not an image this app can read (JPEG, PNG, ...)."


def check_request(path, expressions, limits):
    """Why this request is refused (a message), or None."""
    if len(expressions) > limits.expressions:
        return (f"{len(expressions)} expressions; one request takes at most {limits.expressions} "
                f"(--max_expressions).")
    name = html.escape(os.path.basename(path))
    try:
        width, height = image_size(path)
    except ImageTooLargeError:
        return (f"{name} is too large: more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels; this app takes at "
                f"most {limits.pixels:,} pixels (--max_pixels).")
    except InputError:
        return not_an_image(path)
    if width * height > limits.pixels:
        return (f"The image is {width} x {height} pixels; this app takes at most {limits.pixels:,} "
                f"pixels (--max_pixels).")
    if width * height * len(expressions) > limits.request_pixels:
        return (f"{len(expressions)} expressions on a {width} x {height} image make "
                f"{width * height * len(expressions):,} mask pixels; one request takes at most "
                f"{limits.request_pixels:,} (--max_request_pixels): use fewer expressions or a smaller "
                f"image.")
    return None


def for_display(picture, masks):
    """The picture and masks enlarged (whole times, nearest) when the picture is small, so the
    result is shown at least as large as the input."""
    factor = max(1, DISPLAY_SIZE // max(picture.size))
    if factor == 1:
        return picture, masks
    picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    return picture, masks.repeat(factor, axis=1).repeat(factor, axis=2)


def segment(model, limits, image_path, expressions_text):
    """The Segment button: (overlay, legend, masks download, message)."""
    if model.segmenter is None:
        return None, "", None, model.missing
    if not image_path:
        return None, "", None, "Upload an image (or pick an example) first."
    expressions = [line.strip() for line in (expressions_text or "").splitlines() if line.strip()]
    if not expressions:
        return None, "", None, "Type at least one expression, one per line."
    refusal = check_request(image_path, expressions, limits)
    if refusal:
        return None, "", None, refusal
    try:
        image = to_rgb_image(image_path)
    except InputError:
        return None, "", None, not_an_image(image_path)
    segmenter = model.segmenter
    start = time.perf_counter()
    try:
        (result,) = segmenter.segment_batch([segmenter.prepare(image)], [expressions])
    except InputError as error:
        return None, "", None, html.escape(one_line(error))
    masks = result.masks
    seconds = time.perf_counter() - start
    colours = contrasting_colours(image, masks)
    overlay = segmenter.overlay(*for_display(image, masks), expressions, colours=colours)
    rows = [f'| <span style="background:rgb{colour};display:inline-block;width:1.2em;height:1.2em;'
            f'border:1px solid black"></span> | {html.escape(text)} | {mask.mean() * 100:.1f} % |'
            for colour, text, mask in zip(colours, expressions, masks)]
    legend = "| | expression | mask area |\n|---|---|---|\n" + "\n".join(rows)
    folder = tempfile.mkdtemp(prefix="ris_masks_")
    names = [f"mask_{index + 1}_{_slug(text)}.png" for index, text in enumerate(expressions)]
    for name, mask in zip(names, masks):
        mask_to_image(mask).save(file_in_folder(folder, name))
    download = os.path.join(folder, names[0])
    if len(names) > 1:
        download = os.path.join(folder, "masks.zip")
        with zipfile.ZipFile(download, "w") as archive:
            for name in names:
                archive.write(os.path.join(folder, name), name)
    message = (f"{len(expressions)} expression(s) in {seconds * 1000:.0f} ms on "
               f"{segmenter.device.type} ({model.label})")
    if result.truncated:
        message += (f". Longer than the model's {segmenter.config.token_length} tokens, so read only in "
                    f"part: expression {', '.join(str(index + 1) for index in result.truncated)}")
    return overlay, legend, download, message


def build_app(model, examples=(), limits=None):
    """The page: the image input, the expressions and the button on the left with the examples
    (each an image and an expression that fits it); the result, twice as wide, on the right."""
    limits = limits or Limits()
    with gr.Blocks(title="Referring image segmentation") as app:
        gr.Markdown("## Referring image segmentation\nUpload an image (or pick an example), type what "
                    "to segment (one expression per line), press **Segment**.")
        if model.missing:
            gr.Markdown(f"**No model loaded.** {model.missing}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
                image = image_input(label="image", type="filepath", image_mode=None,
                                    sources=["upload", "clipboard"], elem_id="image")
                expressions = gr.Textbox(label="expressions, one per line", lines=3,
                                         placeholder="the red circle\nthe two blue shapes",
                                         elem_id="expressions")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                if examples:
                    gr.Examples(examples=[[path, text] for path, text in examples], inputs=[image, expressions],
                                label="examples: an image and an expression", elem_id="examples")
            with gr.Column(scale=2, min_width=400):
                overlay = gr.Image(type="pil", format="png", label="result", interactive=False,
                                   elem_id="result")
                message = gr.Markdown(elem_id="message")
                legend = gr.Markdown(elem_id="legend")
                download = gr.File(label="masks (PNG, or a zip for several)", elem_id="download")
        button.click(lambda path, text: segment(model, limits, path, text),
                     inputs=[image, expressions], outputs=[overlay, legend, download, message],
                     api_name="segment")
    return app


def load_model(args):
    checkpoint = args.checkpoint or (DEFAULT_CHECKPOINT if os.path.isfile(DEFAULT_CHECKPOINT) else None)
    if checkpoint is None:
        missing = (f"Without --checkpoint the app serves {DEFAULT_CHECKPOINT}, which does not exist "
                   f"yet: train it with `{TRAIN_TOY_COMMAND}` (minutes on a CPU), or pass "
                   f"--checkpoint.")
        print(f"warning: {missing}", file=sys.stderr)
        return AppModel(missing=missing)
    segmenter = ReferringSegmenter.from_pretrained(checkpoint, sd_path=args.sd_path,
                                                   clip_path=args.clip_path, device=args.device,
                                                   precision=args.precision, max_pixels=None)
    config = segmenter.config
    return AppModel(segmenter, label=f"{os.path.basename(os.path.normpath(checkpoint))}: "
                                     f"{config.preset}, {config.img_size} px")


def bundled_examples():
    """[(image path, expression)] of docs/examples/ (expressions.json names each image's)."""
    with open(EXAMPLE_EXPRESSIONS) as handle:
        expressions = json.load(handle)
    return [(os.path.join(EXAMPLES_DIR, name), expressions[name]) for name in sorted(expressions)]


def example(text):
    """--examples IMAGE or IMAGE=EXPRESSION -> (image path, expression)."""
    if os.path.isfile(text):
        return text, ""
    path, _, expression = text.partition("=")
    if not os.path.isfile(path):
        raise InputError(f"--examples {text}: no such image file (give IMAGE or IMAGE=EXPRESSION)")
    return path, expression


def port_number(text):
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [1, 65535], got {value}")
    return value


def check_port(host, port):
    """One line when the address cannot be listened on (a port in use, an unknown host)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise InputError(f"cannot listen on {host}:{port} ({error.strerror or error}): another "
                             f"program may use --port {port}; pass another --port (or --host)") from None


def main(argv=None):
    parser = get_parser("app", __doc__.splitlines()[0])
    parser.set_defaults(max_pixels=DEFAULT_MAX_PIXELS)
    group = parser.add_argument_group("app")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0: reachable from other machines)")
    group.add_argument("--port", type=port_number, default=7860, help="port to listen on")
    group.add_argument("--share", action="store_true",
                       help="also open a temporary public link through Gradio's servers (needs "
                            "internet)")
    group.add_argument("--examples", nargs="*", default=[],
                       help="example images, each IMAGE or IMAGE=EXPRESSION, after the bundled toy "
                            "images")
    group.add_argument("--max_expressions", type=positive_int, default=DEFAULT_MAX_EXPRESSIONS,
                       help="expressions one request may ask for")
    group.add_argument("--max_request_pixels", type=positive_int, default=DEFAULT_MAX_REQUEST_PIXELS,
                       help="image pixels x expressions one request may ask for (a 4096 x 4096 image "
                            "with 4 expressions; masks cost time in proportion)")
    args = parse_args("app", argv, parser=parser)
    examples = bundled_examples() + [example(text) for text in args.examples]
    check_port(args.host, args.port)  # before the model is loaded: a busy port fails at once
    model = load_model(args)
    app = build_app(model, examples, Limits(args.max_pixels, args.max_expressions, args.max_request_pixels))
    app.queue(default_concurrency_limit=1)  # one model, one request at a time
    print(f"serving {model.label or 'no model'} on http://{args.host}:{args.port}", flush=True)
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False,
                   show_error=True, footer_links=["api"],
                   theme=gr.themes.Default(font=["sans-serif"], font_mono=["monospace"]))
    except OSError as error:  # the port taken since check_port
        raise InputError(f"cannot serve on {args.host}:{args.port}: {one_line(error)}") from None
    return 0


if __name__ == "__main__":
    run_cli(main)
