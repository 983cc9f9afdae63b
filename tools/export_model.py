"""Convert a training checkpoint (ours, or VPD's released vpd_ris_*.pth) into a model folder:
config.json + model.safetensors, the layout `from_pretrained` reads (no pickle), and its model card
README.md (architecture, the checkpoint's training record and best-epoch validation metrics, how to
load it): a Hugging Face Hub repository as it is (`hf upload OWNER/NAME models/refcoco`).

    python tools/export_model.py checkpoints/model_best_refcoco.pth models/refcoco --repo_id me/vpd-refcoco
    python tools/export_model.py vpd_ris_refcoco.pth models/vpd_refcoco --sd_path /weights/sd15
    python tools/export_model.py checkpoints/model_best_gtoy.pth models/gtoy --no_target_area 0.01

The frozen VAE and CLIP of the vpd preset are not stored: they come back from the Stable Diffusion
weights, which must exist (`--sd_path`, recorded in the folder's config and replaceable when loading;
or ./stable-diffusion-v1-5 in the working directory, then not recorded).
"""
import argparse

from engine.args import area_fraction
from models import export_model_folder
from utils.logging import run_cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a training checkpoint (.pth), ours or VPD's")
    parser.add_argument("out_dir", help="the model folder to write")
    parser.add_argument("--sd_path", default=None,
                        help="Stable Diffusion v1.5 weights to record in the folder's config "
                             "(default: what the checkpoint records, else ./stable-diffusion-v1-5 "
                             "when it exists, unrecorded; VPD's checkpoints record none)")
    parser.add_argument("--no_target_area", type=area_fraction, default=None,
                        help="generalized datasets: the 'no target' mask area to record, e.g. the "
                             "fraction bench/no_target_rule.py chose on val (default: the "
                             "checkpoint's)")
    parser.add_argument("--repo_id", default=None,
                        help="the Hugging Face Hub repository the folder is meant for (OWNER/NAME): "
                             "the card loads it by that name (default: by the folder's path)")
    args = parser.parse_args(argv)
    config = export_model_folder(args.checkpoint, args.out_dir, sd_path=args.sd_path,
                                 no_target_area=args.no_target_area, repo_id=args.repo_id)
    print(f"wrote {args.out_dir} (config.json, model.safetensors, README.md): {config.preset}, "
          f"{config.token_length} tokens, {config.img_size} px"
          f"{'' if config.sd_path else '; pass sd_path when loading it'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
