"""The one command-line definition shared by train.py, test.py, demo.py and the benchmarks.

Every default reproduces the published VPD recipe (see README). A few settings depend on the
dataset (the embedded ``toy`` dataset trains a tiny model on a CPU): those flags default to
``None`` in the parser and are filled by :func:`resolve_defaults` from ``DATASET_DEFAULTS``
first and ``PAPER_DEFAULTS`` second, so a flag given on the command line always wins.
"""
import argparse
import os

# Default data and checkpoint folders live inside the repository, wherever it is run from.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The published recipe (VPD-RIS: 8 GPUs x 4 images, AdamW 5e-5, 40 epochs, 512 px, SD v1.5).
PAPER_DEFAULTS = dict(
    model="vpd",
    img_size=512,
    token_length=77,
    batch_size=4,
    epochs=40,
    lr=5e-5,
    workers=4,
    attn_grad=False,
)

# Per-dataset overrides of PAPER_DEFAULTS. `toy` is sized so the README's first command trains
# on two CPU cores in under ten minutes (tiny model: random UNet and text encoder, the small VAE
# that ships with the repository; nothing to download). Chosen from measured CPU runs
# (bench/RESULTS.md): batch 32 uses the cores better than 8, and lr 1e-3 beat 2e-3 and 4e-3.
DATASET_DEFAULTS = {
    "toy": dict(model="tiny", img_size=64, token_length=16, batch_size=32, epochs=22, lr=1e-3,
                workers=1, attn_grad=True),
}

DEFAULT_SD_PATH = os.path.join(REPO_ROOT, "stable-diffusion-v1-5")

DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef", "toy")


def _add_data_flags(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="refcoco", choices=DATASETS,
                       help="which REFER dataset to read (default: refcoco)")
    group.add_argument("--splitBy", default="unc",
                       help="REFER partition: unc (refcoco, refcoco+), umd or google (refcocog)")
    group.add_argument("--split", default="val",
                       help="split to evaluate on: val, test, testA, testB, or `all` in test.py "
                            "(default: val; training always trains on `train`)")
    group.add_argument("--refer_data_root", default=os.path.join(REPO_ROOT, "refer", "data"),
                       help="folder holding images/ and the refcoco*/ folders (see refer/README.md)")
    group.add_argument("--img_size", type=int, default=None,
                       help="images and masks are resized to img_size x img_size (paper: 512)")
    group.add_argument("--token_length", type=int, default=None,
                       help="CLIP tokens per sentence incl. start/end; longer sentences are "
                            "truncated (paper: 40 for RefCOCO/+, 77 for RefCOCOg; default 77)")
    group.add_argument("--workers", type=int, default=None,
                       help="data loader processes per GPU (default: 4)")


def _add_model_flags(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, choices=("vpd", "tiny"),
                       help="model preset: vpd (Stable Diffusion v1.5 sizes, needs --sd_path) or "
                            "tiny (small random model for CPU demos and tests) (default: vpd)")
    group.add_argument("--sd_path", default=None,
                       help="Stable Diffusion v1.5 weights: a diffusers folder (unet/, vae/, "
                            "text_encoder/) or one .ckpt/.safetensors file "
                            "(default: ./stable-diffusion-v1-5)")
    group.add_argument("--clip_path", default=None,
                       help="CLIP ViT-L/14 text model folder (transformers layout); "
                            "default: the text encoder inside --sd_path")
    group.add_argument("--attn_grad", action=argparse.BooleanOptionalAction, default=None,
                       help="let the cross-attention maps fed to the decoder carry gradient "
                            "(default: off, as in VPD; on for toy; --no-attn_grad turns it off)")


def _add_train_flags(parser):
    group = parser.add_argument_group("training")
    group.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                       help="images per process per step (paper: 4 x 8 GPUs)")
    group.add_argument("--epochs", type=int, default=None, help="training epochs (paper: 40)")
    group.add_argument("--lr", type=float, default=None,
                       help="AdamW learning rate, decayed as (1 - it/total)^0.9 (paper: 5e-5)")
    group.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=1e-2,
                       help="AdamW weight decay; never applied to norms, biases and gamma "
                            "(default: 1e-2)")
    group.add_argument("--unet_lr_scale", type=float, default=1.0,
                       help="learning-rate multiplier for the UNet (default 1.0: VPD declared "
                            "0.01 but never applied it, and its numbers come from 1.0)")
    group.add_argument("--output-dir", "--output_dir", dest="output_dir",
                       default=os.path.join(REPO_ROOT, "checkpoints"),
                       help="where model_best_{model_id}.pth and checkpoint_last_{model_id}.pth go")
    group.add_argument("--model_id", default=None,
                       help="name used in checkpoint file names (default: the dataset name)")
    group.add_argument("--resume", default="",
                       help="checkpoint to resume from; without it a run resumes from "
                            "checkpoint_last_{model_id}.pth in --output-dir when present")
    group.add_argument("--no_auto_resume", action="store_true",
                       help="start from scratch even if a last checkpoint exists")
    group.add_argument("--seed", type=int, default=0,
                       help="seed for weights init, data order and sentence sampling")


def _add_eval_flags(parser):
    group = parser.add_argument_group("evaluation")
    group.add_argument("--checkpoint", default=None,
                       help="test.py/demo.py: the checkpoint to evaluate (ours or VPD's released)")
    group.add_argument("--eval_batch_size", type=int, default=8,
                       help="images per process per evaluation step; all sentences of each "
                            "image are evaluated together (default: 8)")
    group.add_argument("--results_json", default=None,
                       help="test.py: also write the results table to this JSON file")
    group.add_argument("--save_masks", default=None,
                       help="test.py: write each predicted mask as {ref_id}_{sent_id}.png here")
    group.add_argument("--vis_dir", default=None,
                       help="test.py: write image | ground truth | prediction panels here")
    group.add_argument("--vis_num", type=int, default=20,
                       help="test.py: how many panels --vis_dir gets (default: 20)")
    group.add_argument("--swap_text", action="store_true",
                       help="test.py: a text-grounding control: score each mask against the "
                            "sentences of another object of the same image (oIoU must drop)")


def _add_demo_flags(parser):
    group = parser.add_argument_group("demo")
    group.add_argument("--image", default=None, help="demo.py: the image to segment")
    group.add_argument("--text", action="append", default=None,
                       help="demo.py: a referring expression; give it several times to draw "
                            "several masks, one colour each")
    group.add_argument("--out", default="overlay.png",
                       help="demo.py: where the image with the blended masks is written")


def _add_speed_flags(parser):
    group = parser.add_argument_group("speed and memory")
    group.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                       help="autocast dtype; auto = bf16 on GPUs that support it, else fp32")
    group.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    group.add_argument("--grad_checkpoint", action="store_true",
                       help="gradient checkpointing in the UNet (less memory, ~30%% slower)")
    group.add_argument("--channels_last", action="store_true",
                       help="channels_last memory format for the convolutional parts")
    group.add_argument("--cache_latents", default=None,
                       help="folder caching the frozen VAE's latents (fp16, one file per image); "
                            "missing images are encoded before training/evaluation starts, then "
                            "items read latents instead of images (test.py ignores it with "
                            "--vis_dir)")
    group.add_argument("--dist_backend", default="auto", choices=("auto", "nccl", "gloo"),
                       help="torch.distributed backend; auto = nccl with GPUs, gloo without")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" unless the help already states it or the default is resolved later."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += f" (default: {action.default})"
        return text


def get_parser(description="VPD referring image segmentation"):
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    _add_data_flags(parser)
    _add_model_flags(parser)
    _add_train_flags(parser)
    _add_eval_flags(parser)
    _add_demo_flags(parser)
    _add_speed_flags(parser)
    return parser


def resolve_defaults(args):
    """Fill flags left at None: the dataset's own defaults first, then the paper's."""
    dataset_defaults = DATASET_DEFAULTS.get(args.dataset, {})
    for key, paper_value in PAPER_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, dataset_defaults.get(key, paper_value))
    # Only the vpd preset needs Stable Diffusion weights; tiny is randomly initialised unless a
    # folder of tiny weights is given explicitly.
    if args.sd_path is None and args.model == "vpd":
        args.sd_path = DEFAULT_SD_PATH
    if args.model_id is None:
        args.model_id = args.dataset
    if args.dataset == "refcocog" and args.splitBy == "unc":
        raise SystemExit("refcocog has no `unc` partition: pass --splitBy umd (or google)")
    return args


def parse_args(argv=None, description="VPD referring image segmentation"):
    return resolve_defaults(get_parser(description).parse_args(argv))
