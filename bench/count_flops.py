"""Count the model's FLOPs per image without weights or a GPU (the model is built on the meta device).

    python bench/count_flops.py --model vpd --img_size 512 --token_length 40

Prints forward (evaluation) and forward + backward (training) FLOPs, with images and with cached
latents (the VAE skipped), as counted by torch.utils.flop_counter.
"""
import torch

from bench.common import count_flops
from engine.args import parse_args
from models import SegmenterConfig, build_model_on_meta


def main(argv=None):
    args = parse_args("count_flops", argv, description=__doc__.splitlines()[0])
    model = build_model_on_meta(SegmenterConfig(preset=args.model, token_length=args.token_length,
                                                img_size=args.img_size, attn_grad=args.attn_grad))
    scale = model.vae_scale_factor
    with torch.device("meta"):
        images = torch.randn(1, 3, args.img_size, args.img_size)
        latents = torch.randn(1, model.backbone.latent_channels, args.img_size // scale,
                              args.img_size // scale)
        input_ids = torch.zeros(1, args.token_length, dtype=torch.long)
        masks = torch.zeros(1, args.img_size, args.img_size, dtype=torch.long)
    print(f"{args.model} at {args.img_size} px, {args.token_length} tokens: TFLOP per image")
    print("| pass | with images | with cached latents |")
    print("|---|---|---|")
    for name, target in (("evaluation (forward)", None), ("training (forward + backward)", masks)):
        with_images = count_flops(model, {"input_ids": input_ids, "images": images}, target)
        with_latents = count_flops(model, {"input_ids": input_ids, "latents": latents}, target)
        print(f"| {name} | {with_images / 1e12:.3f} | {with_latents / 1e12:.3f} |")


if __name__ == "__main__":
    main()
