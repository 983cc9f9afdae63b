"""Pre-train the `tiny` preset's VAE on toy images and write it where the preset loads it from.

Stable Diffusion's VAE is trained once, on images, and then frozen in VPD. The `tiny` preset
mirrors that: its VAE (same diffusers `AutoencoderKL` class, TINY_VAE_CONFIG) is trained here once
to reconstruct toy images and shipped in `models/configs/tiny/vae/` (diffusers layout). A random
frozen VAE is no stand-in: its 4 latent channels keep too little of the image (a linear probe on
an object's mean latent tells the five toy colours apart 45% of the time, 70-80% after this
training), so the segmenter could not learn colour words (bench/RESULTS.md, toy run).

    python tools/pretrain_tiny_vae.py                  # ~7 min on 2 CPU cores, rewrites the shipped VAE
    python tools/pretrain_tiny_vae.py --out /tmp/vae   # somewhere else

Objective: L1 + MSE reconstruction plus a small KL term that keeps the latents near unit scale
(the segmenter reads the posterior mode unscaled, like VPD).
"""
import torch
import torch.nn.functional as F

from data.loaders import split_images
from engine.args import get_parser
from models.presets.tiny import TINY_VAE_DIR, random_tiny_vae
from refer.toy import ensure_toy_dataset
from utils.optim import fit_with_cosine_adamw


def main():
    parser = get_parser("pretrain_tiny_vae", __doc__.split("\n\n")[0])
    parser.set_defaults(out=str(TINY_VAE_DIR), steps=1000, batch_size=32, lr=2e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-4, help="weight of the KL term")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    ensure_toy_dataset(args.refer_data_root)
    _, train_images = split_images(args.refer_data_root, "toy", "train", args.img_size)
    _, val_images = split_images(args.refer_data_root, "toy", "val", args.img_size)
    vae = random_tiny_vae(seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    def reconstruction_loss(step):
        batch = train_images[torch.randint(len(train_images), (args.batch_size,), generator=generator)]
        # Flips: the toy world has no preferred orientation, and they double the image variety.
        if step % 2:
            batch = batch.flip(-1)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        return (F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch)
                + args.kl_weight * posterior.kl().mean())

    fit_with_cosine_adamw(vae.parameters(), reconstruction_loss, args.steps, args.lr, weight_decay=0.0)

    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(val_images[i:i + 64]).latent_dist.mode()
                             for i in range(0, len(val_images), 64)])
        reconstruction = torch.cat([vae.decode(latents[i:i + 64]).sample for i in range(0, len(latents), 64)])
    mse = F.mse_loss(reconstruction.clamp(-1, 1), val_images).item()
    psnr = 10 * torch.log10(torch.tensor(4.0 / mse)).item()  # images span [-1, 1]: peak-to-peak 2
    print(f"val reconstruction PSNR {psnr:.1f} dB; latent mean {latents.mean():.3f} std {latents.std():.3f}")
    vae.save_pretrained(args.out, safe_serialization=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
