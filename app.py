"""Try a referring segmenter in the browser: upload an image, type expressions, see the masks.

    python app.py                                         # checkpoints/model_best_toy.pth
    python app.py --checkpoint checkpoints/model_best_refcoco.pth --sd_path ./stable-diffusion-v1-5
    python app.py --checkpoint my_model/ --port 7861 --examples street.jpg kitchen.jpg

A Gradio app over the inference API (engine/inference.py): the model is loaded once per process
and requests are queued, one at a time. Each expression (one per line) gets its mask in its own
colour with an outline, a legend with the mask's share of the image, and a download (a PNG, or a
zip of PNGs for several). Works offline.
"""
from __future__ import annotations

import html
import os
import re
import sys
import tempfile
import time
import zipfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reports

import gradio as gr  # noqa: E402

from engine.args import get_parser, parse_args, positive_int  # noqa: E402
from engine.inference import ReferringSegmenter, to_rgb_image  # noqa: E402
from utils.errors import InputError, one_line  # noqa: E402
from utils.io import file_in_folder  # noqa: E402
from utils.logging import run_cli  # noqa: E402
from utils.paths import DEFAULT_OUTPUT_DIR, REPO_ROOT  # noqa: E402
from utils.visualize import mask_colours, mask_to_image  # noqa: E402

DEFAULT_CHECKPOINT = os.path.join(DEFAULT_OUTPUT_DIR, "model_best_toy.pth")
TRAIN_TOY_COMMAND = "bash train.sh toy ./logs/toy 1"
EXAMPLES_DIR = os.path.join(REPO_ROOT, "docs", "examples")
DEFAULT_MAX_PIXELS = 4096 * 4096


class AppModel:
    """The model the app serves, or why there is none."""

    def __init__(self, segmenter=None, label="", missing=""):
        self.segmenter, self.label, self.missing = segmenter, label, missing


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "expression"


def segment(model, max_pixels, image_path, expressions_text):
    """The Segment button: (overlay, legend, masks download, message)."""
    if model.segmenter is None:
        return None, "", None, model.missing
    if not image_path:
        return None, "", None, "Upload an image (or pick an example) first."
    expressions = [line.strip() for line in (expressions_text or "").splitlines() if line.strip()]
    if not expressions:
        return None, "", None, "Type at least one expression, one per line."
    try:
        image = to_rgb_image(image_path)
    except InputError:
        return None, "", None, not_an_image(image_path)
    if image.width * image.height > max_pixels:
        return None, "", None, (f"The image is {image.width} x {image.height} pixels; this app takes "
                                f"at most {max_pixels:,} pixels (--max_pixels).")
    start = time.perf_counter()
    try:
        masks = model.segmenter(image, expressions)
    except InputError as error:
        return None, "", None, html.escape(one_line(error))
    seconds = time.perf_counter() - start
    overlay = model.segmenter.overlay(image, masks, expressions)
    colours = mask_colours(len(expressions))
    rows = [f'| <span style="background:rgb{colour};display:inline-block;width:1.2em;height:1.2em">'
            f'</span> | {html.escape(text)} | {mask.mean() * 100:.1f} % |'
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
               f"{model.segmenter.device.type} ({model.label})")
    return overlay, legend, download, message


def not_an_image(path):
    return f"{html.escape(os.path.basename(path))} is not an image this app can read (JPEG, PNG, ...)."


def preview(path):
    """The uploaded file as a picture, or a message when it is not one."""
    if not path:
        return None, ""
    try:
        return to_rgb_image(path), ""
    except InputError:
        return None, not_an_image(path)


def build_app(model, examples=(), max_pixels=DEFAULT_MAX_PIXELS):
    # The upload is a file, decoded here: a file that is not an image gets a message in the page
    # (an image component would reject it with Gradio's own error).
    with gr.Blocks(title="Referring image segmentation") as app:
        gr.Markdown("## Referring image segmentation\nUpload an image, type what to segment "
                    "(one expression per line), press **Segment**.")
        if model.missing:
            gr.Markdown(f"**No model loaded.** {model.missing}")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="image file", type="filepath", elem_id="upload")
                picture = gr.Image(label="image", interactive=False, type="pil", elem_id="picture")
                expressions = gr.Textbox(label="expressions, one per line", lines=3,
                                         placeholder="the red circle\nthe two blue shapes",
                                         elem_id="expressions")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                overlay = gr.Image(type="pil", label="result", interactive=False, elem_id="result")
                legend = gr.Markdown(elem_id="legend")
                download = gr.File(label="masks (PNG, or a zip for several)", elem_id="download")
                message = gr.Markdown(elem_id="message")
        if examples:
            gr.Examples(examples=[[path] for path in examples], inputs=[upload], label="examples")
        upload.change(preview, inputs=[upload], outputs=[picture, message], api_name=False)
        button.click(lambda path, text: segment(model, max_pixels, path, text),
                     inputs=[upload, expressions], outputs=[overlay, legend, download, message],
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
                                                   precision=args.precision)
    config = segmenter.config
    return AppModel(segmenter, label=f"{os.path.basename(os.path.normpath(checkpoint))}: "
                                     f"{config.preset}, {config.img_size} px")


def main(argv=None):
    parser = get_parser("app", __doc__.splitlines()[0])
    group = parser.add_argument_group("app")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0: reachable from other machines)")
    group.add_argument("--port", type=positive_int, default=7860, help="port to listen on")
    group.add_argument("--share", action="store_true",
                       help="also open a temporary public link through Gradio's servers (needs "
                            "internet)")
    group.add_argument("--examples", nargs="*", default=[],
                       help="image files offered as examples, after the bundled toy images")
    group.add_argument("--max_pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                       help="larger images are refused with a message")
    args = parse_args("app", argv, parser=parser)
    for path in args.examples:
        if not os.path.isfile(path):
            raise InputError(f"--examples {path}: no such image file")
    bundled = sorted(os.path.join(EXAMPLES_DIR, name) for name in os.listdir(EXAMPLES_DIR)
                     if name.endswith((".jpg", ".png")))
    model = load_model(args)
    app = build_app(model, bundled + list(args.examples), args.max_pixels)
    app.queue(default_concurrency_limit=1)  # one model, one request at a time
    print(f"serving {model.label or 'no model'} on http://{args.host}:{args.port}", flush=True)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False,
               show_error=True, footer_links=["api"],
               theme=gr.themes.Default(font=["sans-serif"], font_mono=["monospace"]))
    return 0


if __name__ == "__main__":
    run_cli(main)
