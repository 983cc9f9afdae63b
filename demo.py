"""Segment what sentences refer to in one image and draw the masks on it.

    python demo.py --checkpoint checkpoints/model_best_toy.pth --image scene.jpg \\
        --text "the red circle" --text "the smaller of the two blue shapes" --out overlay.png

The model preset, token length and image size are read from the checkpoint unless given as
flags; the vpd preset also needs --sd_path (the frozen VAE and CLIP are not in our checkpoints).
"""
import torch
import torch.nn.functional as F

from data.tokenizer import CLIPTokenizer
from data.transforms import ImageMaskTransform, load_rgb
from models import build_model, load_segmenter_state
from utils.args import get_parser, resolve_defaults
from utils.checkpoint import load_checkpoint, model_state_from_checkpoint
from utils.logging import run_cli
from utils.visualize import PALETTE, draw_caption, overlay_masks

# Flags a checkpoint remembers from its training run and that the demo must match.
FLAGS_FROM_CHECKPOINT = ("model", "token_length", "img_size")


@torch.no_grad()
def predict_masks(model, image, sentences, img_size, token_length, device):
    """(H, W) bool masks at the image's own size, one per sentence."""
    pixels = ImageMaskTransform(img_size).image_to_tensor(image)
    tokenizer = CLIPTokenizer(token_length)
    input_ids, attention_mask = map(torch.stack, zip(*(tokenizer(text) for text in sentences)))
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                   images=pixels[None].to(device),
                   image_index=torch.zeros(len(sentences), dtype=torch.long, device=device))
    # Back to the original resolution: upsample the logits, not the argmax mask.
    logits = F.interpolate(logits.float(), size=(image.height, image.width), mode="bilinear",
                           align_corners=False)
    return [mask.cpu().numpy() for mask in logits.argmax(dim=1).bool()]


def main(argv=None):
    args = get_parser(__doc__.splitlines()[0]).parse_args(argv)
    if not (args.checkpoint and args.image and args.text):
        raise SystemExit("demo.py needs --checkpoint, --image and at least one --text")
    state = load_checkpoint(args.checkpoint)
    trained_with = state.get("args") or {}
    for flag in FLAGS_FROM_CHECKPOINT:
        if getattr(args, flag) is None and trained_with.get(flag) is not None:
            setattr(args, flag, trained_with[flag])
    if args.sd_path is None and args.model == "tiny":
        args.sd_path = trained_with.get("sd_path")
    resolve_defaults(args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args)
    load_segmenter_state(model, model_state_from_checkpoint(state, args.checkpoint))
    model.to(device).eval()

    image = load_rgb(args.image)
    masks = predict_masks(model, image, args.text, args.img_size, args.token_length, device)
    overlay = overlay_masks(image, masks)
    lines = [f'{text}  ({mask.mean() * 100:.1f}% of the image)' for text, mask in zip(args.text, masks)]
    draw_caption(overlay, lines, colours=PALETTE).save(args.out)
    print(f"wrote {args.out}: " + "; ".join(lines))
    return 0


if __name__ == "__main__":
    run_cli(main)
