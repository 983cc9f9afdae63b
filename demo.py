"""Segment what sentences refer to in one image and draw the masks on it.

    python demo.py --checkpoint checkpoints/model_best_toy.pth --image scene.jpg \\
        --text "the red circle" --text "the smaller of the two blue shapes" --out overlay.png

A thin command line over the inference API (engine/inference.py): the model's preset, token length
and image size come from the checkpoint (or model folder, or Hugging Face Hub id); the vpd preset
also needs the Stable Diffusion weights its frozen VAE and CLIP come from (--sd_path, or the path
the checkpoint records, or ./stable-diffusion-v1-5 when it exists).
"""
import os

from PIL import Image

from engine.args import parse_args, reconcile_model_config
from engine.inference import ReferringSegmenter, to_rgb_image
from utils.errors import InputError
from utils.logging import run_cli


def main(argv=None):
    args = parse_args("demo", argv, description=__doc__.splitlines()[0])
    missing = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--image", args.image),
                                        ("--text", args.text)) if not value]
    if missing:
        raise InputError(f"demo.py needs {', '.join(missing)} (see demo.py --help)")
    if os.path.isdir(args.image):
        raise InputError(f"--image {args.image} is a folder; expected an image file")
    extension = os.path.splitext(args.out)[1].lower()
    if extension not in Image.registered_extensions():
        raise InputError(f"--out {args.out}: unknown image extension {extension or '(none)'}; use "
                         f".png or .jpg")
    image = to_rgb_image(args.image, args.max_pixels)  # a bad image fails before the model is loaded

    segmenter = ReferringSegmenter.from_pretrained(
        args.checkpoint, device=args.device, precision=args.precision, max_pixels=args.max_pixels,
        configure=lambda config: reconcile_model_config(config, args, args.checkpoint))
    masks = segmenter(image, args.text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    segmenter.overlay(image, masks, args.text).save(args.out)
    print(f"wrote {args.out}: " + "; ".join(f"{text} ({mask.mean() * 100:.1f}% of the image)"
                                            for text, mask in zip(args.text, masks)))
    return 0


if __name__ == "__main__":
    run_cli(main)
