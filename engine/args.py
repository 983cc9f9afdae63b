"""The command line of every program: one definition per flag, in groups; each program's parser
holds only the groups it reads (`PROGRAM_GROUPS`), so a flag a program does not read is an
argparse error there and its --help lists only its own flags.

Defaults reproduce the published VPD recipe. A few settings depend on the dataset (the embedded
``toy`` dataset trains a tiny model on a CPU; RefCOCO/+ use 40 tokens) or on the model (its
preset's training recipe, models/registry.py): those flags default to ``None`` in the parser and
are filled by :func:`resolve_defaults` from the dataset's recipe in the catalog (refer/catalog.py)
first, then ``PAPER_DEFAULTS`` and the preset's recipe, so a flag given on the command line always
wins. test.py and the demo take the model's settings (preset, token length, image size) from the
checkpoint instead.

Cheap flag values (sizes, splits, partitions) are checked here, before any image is read.
"""
import argparse
import os
import sys

from models import LOSS_TERMS, PRESETS, LossConfig, SegmenterConfig, complete_config, get_preset
from refer.catalog import (JSONL_PREFIX, CatalogError, dataset_names, get_dataset,
                           joint_training_refusal, parse_dataset_item)
from utils.errors import InputError
from utils.io import is_plain_file_name
from utils.paths import DEFAULT_DATA_ROOT, DEFAULT_OUTPUT_DIR

from .inference import MAX_PIXELS
from .precision import PRECISION_CHOICES
from .training import COMPILE_MODES, WEIGHT_DECAY_RULES


# The published setting (VPD-RIS: 512 px, SD v1.5): the flags' defaults where the dataset's recipe
# says nothing; the optimisation recipe (8 GPUs x 4 images, AdamW 5e-5, 40 epochs) is the model
# preset's (RECIPE_FLAGS).
PAPER_DEFAULTS = dict(
    model="vpd",
    dice_weight=0.0,
    img_size=512,
    token_length=77,
    workers=4,
    attn_grad=False,
    no_target_area=0.0,
    cache_latents=None,
    eval_batch_size=8,
    channels_last=False,
)

# Flags whose default is the model preset's training recipe (models.Recipe): flag -> its value.
RECIPE_FLAGS = {
    "lr": lambda recipe: recipe.lr,
    "wd": lambda recipe: recipe.weight_decay,
    "weight_decay_rule": lambda recipe: recipe.weight_decay_rule,
    "epochs": lambda recipe: recipe.epochs,
    "batch_size": lambda recipe: recipe.batch_size,
    "warmup_epochs": lambda recipe: recipe.warmup_epochs,
}

# Flags of VPD's / LAVT's command lines that change nothing here: accepted with one warning each.
IGNORED_VPD_FLAGS = {
    "--ddp_trained_weights": "checkpoint prefixes (DDP's 'module.') are detected anyway",
    "--ck_bert": "VPD never reads it; the text encoder is CLIP",
    "--bert_tokenizer": "the tokenizer is CLIP's",
    "--fusion_drop": "VPD never reads it",
    "--pretrained_swin_weights": "there is no Swin backbone",
    "--swin_type": "there is no Swin backbone",
    "--window12": "there is no Swin backbone",
    "--mha": "LAVT's fusion option; VPD has none",
}
IGNORED_FLAG_NAMES = tuple(flag.lstrip("-") for flag in IGNORED_VPD_FLAGS)


# ---------------------------------------------------------------------------------- value types
def _integer(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = _integer(1)
nonnegative_int = _integer(0)


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _named_value(text, form, example):
    """NAME=VALUE -> (name, a non-negative number): --lr_scale, --loss_weight."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected {form} such as {example}, got {text!r}")
    return name, nonnegative_float(value)


def lr_scale_setting(text):
    """--lr_scale GROUP=VALUE -> (group, value); the group is checked against the preset later."""
    return _named_value(text, "GROUP=VALUE", "unet=0.01")


def loss_weight_item(text):
    """--loss_weight TERM=WEIGHT -> (term, weight) for a registered loss term."""
    name, weight = _named_value(text, "TERM=WEIGHT", "cross_entropy=0.5")
    if name == "dice":
        raise argparse.ArgumentTypeError("the Dice term's weight is --dice_weight")
    if name not in LOSS_TERMS:
        raise argparse.ArgumentTypeError(f"unknown loss term {name!r}; known: {', '.join(LOSS_TERMS)} "
                                         f"(models.register_loss_term adds one)")
    return name, weight


def area_fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.005, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


# --------------------------------------------------------------------------------------- groups
def dataset_list(text):
    """--dataset: one name of the catalog (or jsonl:FOLDER), or several joined by commas for joint
    training, each optionally with its partition (refcocog:google)."""
    items = [item.strip() for item in text.split(",")]
    names = [parse_dataset_item(item)[0] for item in items]
    try:
        records = [get_dataset(name) for name in names]
    except CatalogError as error:
        raise argparse.ArgumentTypeError(f"{error}; several joined by commas train jointly") from None
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} listed twice in {text!r}")
    if len(items) > 1:
        refusal = joint_training_refusal(records)
        if refusal:
            raise argparse.ArgumentTypeError(f"{text!r}: {refusal}")
    return ",".join(items)


def dataset_members(args):
    """[(dataset, splitBy)] of --dataset: each item's own partition, else --splitBy, else the
    dataset's default."""
    members = []
    for item in args.dataset.split(","):
        name, splitBy = parse_dataset_item(item)
        members.append((name, splitBy or args.splitBy or get_dataset(name).default_partition))
    return members


def recipe_note(flag, show=str):
    """The datasets whose recipe sets `flag`, by value, for help texts: 'toy, gtoy: 0'."""
    by_value = {}
    for name in dataset_names():
        recipe = get_dataset(name).recipe
        if flag in recipe:
            by_value.setdefault(show(recipe[flag]), []).append(name)
    return "; ".join(f"{', '.join(names)}: {value}" for value, names in by_value.items())


def _on_off(value):
    return "on" if value else "off"


def _add_workers(group):
    group.add_argument("-j", "--workers", type=nonnegative_int, default=None,
                       help=f"data loader processes per GPU (default: {PAPER_DEFAULTS['workers']}; "
                            f"{recipe_note('workers')})")


def _add_text(group):
    group.add_argument("--text", action="append", default=None,
                       help="a referring expression; give it several times for several (demo.py: "
                            "one colour each; predict.py: every image with every expression)")


def _add_refer_data_root(group):
    group.add_argument("--refer_data_root", default=DEFAULT_DATA_ROOT,
                       help="folder holding images/ and the refcoco*/ folders (see refer/README.md); "
                            "the toy datasets are generated in it (a jsonl: dataset names its own "
                            "folder)")


def _data(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="refcoco", type=dataset_list,
                       help=f"which dataset of the catalog to read: {', '.join(dataset_names())}, "
                            f"or {JSONL_PREFIX}FOLDER (a folder of {{split}}.jsonl files, README "
                            f"'Your own data'); train.py also takes several joined by commas "
                            f"(refcoco,refcoco+,refcocog:umd) for joint training without test "
                            f"leakage (default: refcoco)")
    group.add_argument("--splitBy", default=None,
                       help="REFER partition: unc (refcoco, refcoco+), umd or google (refcocog) "
                            "(default: the dataset's, umd for refcocog, else unc; in a joint list "
                            "give it per dataset, refcocog:google)")
    _add_refer_data_root(group)
    _add_workers(group)
    group.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=None,
                       help="page-locked loader memory (default: on when a GPU is used)")


def _split(parser):
    group = parser.add_argument_group("held-out split")
    group.add_argument("--split", default="val",
                       help="train.py validates on this split after every epoch; test.py evaluates "
                            "it, or every held-out split with `all` (default: val)")


_FROM_CHECKPOINT = "test.py and demo.py read these from the checkpoint; given there, they must agree"


def _model(parser):
    group = parser.add_argument_group("model", _FROM_CHECKPOINT)
    group.add_argument("--model", default=None, choices=tuple(PRESETS),
                       help="model preset: " + "; ".join(f"{name}: {preset.description}"
                                                         for name, preset in PRESETS.items())
                            + f" (default: {PAPER_DEFAULTS['model']}; {recipe_note('model')})")
    group.add_argument("--attn_grad", action=argparse.BooleanOptionalAction, default=None,
                       help="let the cross-attention maps fed to the decoder carry gradient "
                            f"(default: off, as in VPD; {recipe_note('attn_grad', _on_off)})")
    group.add_argument("--no_target_area", type=area_fraction, default=None,
                       help="generalized datasets (gtoy, grefcoco): a mask covering at most this "
                            "fraction of the image counts as 'no target' and is emptied (default: "
                            f"0, only an empty mask; {recipe_note('no_target_area')}, chosen on "
                            f"its val split)")


def _input(parser):
    group = parser.add_argument_group("input size", _FROM_CHECKPOINT)
    group.add_argument("--img_size", type=positive_int, default=None,
                       help="images and masks are resized to img_size x img_size (paper: 512)")
    group.add_argument("--token_length", type=_integer(2), default=None,
                       help="CLIP tokens per sentence incl. start/end; longer sentences are "
                            "truncated (paper: 40 for RefCOCO/+, 77 for RefCOCOg)")


def _weights(parser):
    group = parser.add_argument_group("pretrained weights")
    defaults = "; ".join(f"{name}: {preset.weights.default_path}" for name, preset in PRESETS.items()
                         if preset.weights is not None and preset.weights.default_path)
    group.add_argument("--sd_path", default=None,
                       help="the pretrained weights of the model preset, for vpd Stable Diffusion "
                            "v1.5: a diffusers folder (unet/, vae/, text_encoder/) or one "
                            ".ckpt/.safetensors file (test.py, demo.py, app.py: default the path "
                            "the checkpoint records; else the preset's default when it exists, "
                            f"relative to the working directory, {defaults}; tiny needs none)")
    group.add_argument("--clip_path", default=None,
                       help="CLIP ViT-L/14 text model folder (transformers layout) replacing the "
                            "text encoder inside --sd_path")


def _random_weights(parser):
    group = parser.add_argument_group("benchmark")
    group.add_argument("--random_weights", action="store_true",
                       help="build the model at its real sizes with random weights, frozen parts "
                            "included, instead of reading --sd_path: for measuring speed "
                            "(bench/train_run.py), never for a model to use")


def _batch(parser):
    group = parser.add_argument_group("batch")
    group.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", type=positive_int,
                       default=None, help="images per process per step (default: the preset's "
                                          "recipe; paper: 4 x 8 GPUs, EVP: 3 x 2)")


def _seed(parser):
    group = parser.add_argument_group("seed")
    group.add_argument("--seed", type=nonnegative_int, default=0,
                       help="seed for data order and sentence sampling (weights are seeded apart)")


def _optimization(parser):
    group = parser.add_argument_group("optimization")
    group.add_argument("--epochs", type=positive_int, default=None,
                       help="training epochs (default: the preset's recipe; paper: 40, EVP: 20)")
    group.add_argument("--lr", type=positive_float, default=None,
                       help="AdamW learning rate, decayed by the preset's schedule (vpd: (1 - "
                            "it/total)^0.9; evp: cosine after a warm-up from 1e-7) (default: the "
                            "preset's recipe; paper: 5e-5, EVP: 8e-5)")
    group.add_argument("--wd", "--weight-decay", dest="wd", type=nonnegative_float, default=None,
                       help="AdamW weight decay (default: the preset's recipe; paper and EVP: 1e-2)")
    group.add_argument("--weight_decay_rule", default=None, choices=WEIGHT_DECAY_RULES,
                       help="which tensors decay: vpd = VPD's rule, every tensor whose name in "
                            "VPD's model lacks 'norm' (biases and most norms included); evp = "
                            "EVP's, the same on EVP's names except that every CLIP and VAE tensor "
                            "decays; modern = only tensors of more than one dimension, a deviation "
                            "from both (default: the preset's recipe; paper: vpd)")
    group.add_argument("--lr_scale", type=lr_scale_setting, action="append", default=None,
                       metavar="GROUP=VALUE",
                       help="learning-rate multiplier of one optimizer group of the preset (vpd: "
                            "unet, head; evp: unet, text_encoder, vae, head), repeatable, e.g. "
                            "--lr_scale unet=0.01 (default: the preset's recipe; vpd: unet=1, VPD "
                            "declared 0.01 but never applied it, and its numbers come from 1; evp: "
                            "unet, text_encoder and vae 1e-4, EVP's declared 0.01 applied twice "
                            "by its code)")
    group.add_argument("--amsgrad", action="store_true", help="AdamW's AMSGrad variant (VPD: off)")
    group.add_argument("--warmup_epochs", type=nonnegative_float, default=None,
                       help="epochs of linear learning-rate warm-up before the preset's decay "
                            "(default: the preset's recipe; VPD: 0, EVP: 1)")
    group.add_argument("--dice_weight", type=nonnegative_float, default=None,
                       help="weight of a soft Dice term added to the cross-entropy loss (default: "
                            "0, VPD's loss is cross-entropy alone; toy: "
                            f"{get_dataset('toy').recipe['dice_weight']}, it lifts the slow seeds "
                            "of the 5-epoch CPU run, bench/RESULTS.md)")
    group.add_argument("--loss_weight", type=loss_weight_item, action="append", default=[],
                       metavar="TERM=WEIGHT",
                       help="the weight of a term of the loss (models/loss.py: "
                            f"{', '.join(LOSS_TERMS)}, and any registered with "
                            "models.register_loss_term), e.g. cross_entropy=0.5; give it once per "
                            "term (default: cross_entropy=1, dice=--dice_weight, VPD's loss)")
    group.add_argument("--accum_steps", type=positive_int, default=1,
                       help="gradient accumulation: batches per optimizer step, so the global "
                            "batch is batch-size x processes x accum_steps (VPD's 32 on 2 GPUs: "
                            "-b 4 --accum_steps 4); the schedule counts optimizer steps "
                            "(default: 1)")


def _run_output(parser):
    group = parser.add_argument_group("checkpoints and logs")
    group.add_argument("--output-dir", "--output_dir", dest="output_dir",
                       default=DEFAULT_OUTPUT_DIR,
                       help="where model_best_{model_id}.pth and checkpoint_last_{model_id}.pth go; "
                            "all nodes of a multi-node run must see the same folder")
    group.add_argument("--model_id", default=None,
                       help="name used in checkpoint file names (default: the dataset name)")
    group.add_argument("--resume", default="",
                       help="checkpoint to resume from; without it a run resumes from "
                            "checkpoint_last_{model_id}.pth in --output-dir when present")
    group.add_argument("--no_auto_resume", action="store_true",
                       help="start from scratch even if a last checkpoint exists (an earlier "
                            "run's checkpoint_last and model_best are kept, renamed "
                            "*.previous-RUNID.pth)")
    group.add_argument("--log_dir", default=None,
                       help="where log.txt goes (train.sh passes its LOGDIR; default: "
                            "{output-dir}/logs/{model_id})")
    group.add_argument("--print-freq", "--print_freq", dest="print_freq", type=nonnegative_int,
                       default=10,
                       help="every N iterations: a row in metrics.jsonl and TensorBoard, and a "
                            "progress line in the log when no progress bar is shown (0: none) "
                            "(default: 10, as VPD)")
    group.add_argument("--no_tensorboard", action="store_true",
                       help="do not write TensorBoard event files into the log folder")


def _evaluation(parser):
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval_batch_size", type=positive_int, default=None,
                       help="images per process per evaluation step; all sentences of each "
                            f"image are evaluated together (default: "
                            f"{PAPER_DEFAULTS['eval_batch_size']}; {recipe_note('eval_batch_size')})")


def _validation_precision(parser):
    group = parser.add_argument_group("validation")
    group.add_argument("--eval_precision", default="fp32", choices=PRECISION_CHOICES,
                       help="autocast of the per-epoch validation (default: fp32, as VPD)")


def _model_input(parser):
    group = parser.add_argument_group("model to load")
    group.add_argument("--checkpoint", "--resume", dest="checkpoint", default=None,
                       help="a training checkpoint (ours or VPD's released one) or a model folder "
                            "(config.json + model.safetensors); --resume as in VPD's test.sh")


def _test_outputs(parser):
    group = parser.add_argument_group("test outputs")
    group.add_argument("--results_json", default=None,
                       help="also write the results table to this JSON file")
    group.add_argument("--save_masks", default=None,
                       help="write each predicted mask as {ref_id}_{sent_id}.png here")
    group.add_argument("--vis_dir", default=None,
                       help="write image | ground truth | prediction panels here")
    group.add_argument("--vis_num", type=nonnegative_int, default=20,
                       help="how many panels --vis_dir gets (default: 20)")
    group.add_argument("--swap_text", action="store_true",
                       help="a text-grounding control: score each mask against the sentences of "
                            "another object of the same image, or of another image for "
                            "generalized datasets (gtoy, grefcoco); scores must drop")


def _demo(parser):
    group = parser.add_argument_group("demo")
    group.add_argument("--image", default=None, help="the image to segment")
    _add_text(group)
    group.add_argument("--out", default="overlay.png",
                       help="where the image with the blended masks is written (.png, .jpg, ...)")


def _predict(parser):
    group = parser.add_argument_group(
        "batch prediction", "a JSONL manifest (one image and its expressions a line), or a folder "
                            "of images with --text expressions for every image")
    group.add_argument("--manifest", default=None,
                       help='JSONL file, one line per image: {"image": "a.jpg", "sentences": ["the '
                            'dog", "the red car"], "id": "optional name of its masks"}')
    group.add_argument("--image_root", default=None,
                       help="folder the manifest's image paths are relative to (default: the "
                            "manifest's folder)")
    group.add_argument("--images", default=None,
                       help="a folder of images (its image files, not its subfolders), each "
                            "segmented with every --text")
    _add_text(group)
    group.add_argument("--out", default=None,
                       help="output folder: masks/, predictions.jsonl, errors.jsonl (overlays/ with "
                            "--overlays); rerunning the same command there resumes")
    group.add_argument("--overlays", action="store_true",
                       help="also draw each image with its masks and legend, as demo.py does, in "
                            "overlays/{id}.png")
    _add_workers(group)


def _image_guard(parser):
    group = parser.add_argument_group("image size")
    group.add_argument("--max_pixels", type=positive_int, default=MAX_PIXELS,
                       help="images with more pixels are refused, before they are decoded; those "
                            "below are downscaled for the model and get masks at their own size")


def _precision(parser):
    group = parser.add_argument_group("precision")
    group.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES,
                       help="autocast dtype of this program's passes (train.py: the training "
                            "steps); auto = bf16 on GPUs that support it, else fp32 (default: fp32, "
                            "as VPD)")


def _speed(parser):
    group = parser.add_argument_group("speed and memory")
    group.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                       metavar="MODE",
                       help="torch.compile the whole training step (text encoder, adapter, UNet, "
                            "decoder, loss and their backward) as one graph, and evaluation's "
                            "forward; MODE is torch.compile's: default (given alone), "
                            "max-autotune-no-cudagraphs (longer compile, tuned kernels), "
                            "reduce-overhead or max-autotune (CUDA graphs for the training step's "
                            "fixed shapes; evaluation compiles without them). The first steps "
                            "take minutes at full size (bench/RESULTS.md) (default: eager)")
    group.add_argument("--grad_checkpoint", action="store_true",
                       help="gradient checkpointing in the UNet (less memory, ~30%% slower)")
    group.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                       help=f"channels_last memory format for the convolutional parts (default: "
                            f"off; {recipe_note('channels_last', _on_off)}, ~6%% faster on a CPU)")
    group.add_argument("--bn_group_size", type=positive_int, default=None,
                       help="the decoder's BatchNorm statistics over groups of this many images of "
                            "a process's batch, without SyncBatchNorm ('ghost' batch norm; must "
                            "divide --batch-size). Default: over the whole batch, and over every "
                            "process's with SyncBatchNorm on GPUs: VPD's statistics (its "
                            "SyncBatchNorm normalised over all 32 images of 8 GPUs x 4, which one "
                            "GPU's batch of 32 equals: tests/test_batch_norm.py); 4 is 8 GPUs x 4 "
                            "without SyncBatchNorm")
    group.add_argument("--ddp_static_graph", action="store_true",
                       help="DistributedDataParallel(static_graph=True): the same parameters take "
                            "part in every step, so DDP may skip its per-step search and reorder "
                            "its buckets (not measured on several GPUs yet)")
    group.add_argument("--ddp_bucket_mb", type=positive_int, default=25,
                       help="DistributedDataParallel's gradient bucket size in MiB: larger buckets "
                            "mean fewer all-reduces of the 3.4 GB of UNet gradients (torch's "
                            "default: 25)")
    group.add_argument("--frozen_bf16", action="store_true",
                       help="hold the frozen VAE and CLIP text encoder in bf16 (needs --precision "
                            "bf16; their norms then see bf16-rounded weights: not VPD's numerics)")


def _latent_cache(parser):
    group = parser.add_argument_group("latent cache")
    group.add_argument("--cache_latents", default=None,
                       help="folder caching the VAE's latents (fp16, one file per image); "
                            "missing images are encoded before training/evaluation starts, then "
                            "items read latents instead of images (test.py ignores it with "
                            "--vis_dir; train.py refuses it for a model whose VAE trains, evp); "
                            "none: encode the images every time (default: none; "
                            f"{recipe_note('cache_latents', lambda _: 'latents/ in the dataset folder')}"
                            ", except for a model whose VAE trains)")


def _device(parser):
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="auto",
                       help="auto (a GPU when present), cpu, cuda or cuda:N; under torchrun each "
                            "process takes the GPU of its local rank (default: auto)")


def _cpu_threads(parser):
    group = parser.add_argument_group("cpu threads")
    group.add_argument("--fixed_cpu_threads", action="store_true",
                       help="on a CPU keep OMP_NUM_THREADS threads throughout (default: one thread "
                            "per core that other processes leave free, rechecked every 5 s; "
                            "utils/cpu_threads.py)")


def _threads(parser):
    group = parser.add_argument_group("threads")
    group.add_argument("--threads", type=positive_int, default=None,
                       help="torch intra-op threads of this process (default: torch's); figures "
                            "on a CPU depend on it")


def _distributed(parser):
    group = parser.add_argument_group("distributed")
    group.add_argument("--dist_backend", default="auto", choices=("auto", "nccl", "gloo"),
                       help="torch.distributed backend; auto = nccl with GPUs, gloo without")
    group.add_argument("--local_rank", "--local-rank", dest="local_rank", type=nonnegative_int,
                       default=None,
                       help="set by `python -m torch.distributed.launch`; LOCAL_RANK from the "
                            "environment is used when present")


def _tiny_pretraining(parser):
    group = parser.add_argument_group(
        "pre-training a part of the tiny preset on the toy's train images",
        "tools/pretrain_tiny_vae.py and tools/pretrain_tiny_unet.py; each sets its own defaults")
    _add_refer_data_root(group)
    group.add_argument("--out", default=None,
                       help="diffusers folder to write (config.json + weights) (default: the "
                            "folder the tiny preset loads it from)")
    group.add_argument("--img_size", type=positive_int, default=get_dataset("toy").recipe["img_size"],
                       help="training image size (default: the toy's, %(default)s)")
    group.add_argument("--steps", type=positive_int, default=None, help="optimizer steps")
    group.add_argument("--batch_size", type=positive_int, default=None, help="images per step")
    group.add_argument("--lr", type=positive_float, default=None,
                       help="AdamW learning rate, decayed to 0 on a cosine")
    group.add_argument("--seed", type=nonnegative_int, default=0,
                       help="initialisation, batch order and noise")


def _vpd_compat(parser):
    group = parser.add_argument_group(
        "accepted from VPD / LAVT command lines", "these change nothing here; each prints a warning")
    for flag, reason in IGNORED_VPD_FLAGS.items():
        if flag in ("--ddp_trained_weights", "--window12"):
            group.add_argument(flag, action="store_true", help=f"ignored: {reason}")
        else:
            group.add_argument(flag, default=None, help=f"ignored: {reason}")


GROUPS = {
    "data": _data, "split": _split, "model": _model, "input": _input, "weights": _weights,
    "batch": _batch, "seed": _seed, "optimization": _optimization, "run_output": _run_output,
    "evaluation": _evaluation, "validation_precision": _validation_precision,
    "model_input": _model_input, "test_outputs": _test_outputs, "demo": _demo, "predict": _predict,
    "image_guard": _image_guard,
    "precision": _precision, "speed": _speed, "latent_cache": _latent_cache, "device": _device,
    "threads": _threads, "cpu_threads": _cpu_threads, "distributed": _distributed,
    "tiny_pretraining": _tiny_pretraining, "vpd_compat": _vpd_compat,
    "random_weights": _random_weights,
}

# Each program's flags, by group. The benchmarks add flags of their own that no other program has.
PROGRAM_GROUPS = {
    "train": ("data", "split", "model", "input", "weights", "batch", "seed", "optimization",
              "run_output", "evaluation", "validation_precision", "precision", "speed",
              "latent_cache", "device", "cpu_threads", "distributed", "random_weights",
              "vpd_compat"),
    "test": ("data", "split", "model_input", "model", "input", "weights", "evaluation",
             "test_outputs", "precision", "latent_cache", "device", "distributed", "vpd_compat"),
    "demo": ("model_input", "model", "input", "weights", "demo", "precision", "device", "image_guard"),
    "predict": ("model_input", "model", "input", "weights", "random_weights", "predict", "evaluation",
                "precision", "device", "image_guard", "distributed"),
    "app": ("model_input", "weights", "precision", "device", "image_guard"),
    "bench_model": ("model", "input", "batch", "seed", "device", "threads"),
    "bench_loader": ("input", "batch", "threads"),
    "count_flops": ("model", "input"),
    "bench_memory": ("model", "input", "batch", "seed"),
    "bench_no_target": ("data", "model_input", "evaluation", "device"),
    "pretrain_tiny_vae": ("tiny_pretraining",),
    "pretrain_tiny_unet": ("tiny_pretraining",),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like the programs' other input errors."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" unless the help already states it or the default is resolved later."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += f" (default: {action.default})"
        return text


def build_parser(groups, description=None):
    """A parser with the flags of `groups` (names of GROUPS); programs add their own after."""
    parser = _Parser(description=description, formatter_class=_HelpFormatter)
    for name in groups:
        GROUPS[name](parser)
    return parser


def get_parser(program, description=None):
    return build_parser(PROGRAM_GROUPS[program], description)


# ---------------------------------------------------------------------------- defaults and checks
def resolve_defaults(args, model_flags=True):
    """Fill flags left at None: the dataset's recipe (refer/catalog.py) first, then the paper's
    setting and the model preset's training recipe.

    `model_flags=False` (test.py, demo.py) leaves the model's settings unset, to be taken from the
    checkpoint.
    """
    if hasattr(args, "dataset"):
        args.datasets = dataset_members(args)
        if len(args.datasets) == 1:
            args.splitBy = args.datasets[0][1]
    records = [get_dataset(name) for name, _ in getattr(args, "datasets", [])]
    recipes = [record.flag_defaults(args.refer_data_root) for record in records]

    def fill(key, fallback):
        if not hasattr(args, key) or getattr(args, key) is not None:
            return
        if key in MODEL_FLAGS and not model_flags:
            return
        values = [recipe.get(key, fallback) for recipe in recipes] or [fallback]
        # A joint list takes the largest token length of its members; other settings agree.
        setattr(args, key, max(values) if key == "token_length" else values[0])

    given_cache_latents = getattr(args, "cache_latents", None)
    for key, paper_value in PAPER_DEFAULTS.items():
        fill(key, paper_value)
    if getattr(args, "model", None) is not None:
        preset = get_preset(args.model)
        for key, value_of in RECIPE_FLAGS.items():
            fill(key, value_of(preset.recipe))
        if hasattr(args, "lr_scale"):  # the recipe's scales, with the groups given replaced
            args.lr_scale = {**preset.recipe.lr_scales, **dict(args.lr_scale or [])}
        if "backbone.vae" not in preset.frozen_modules and given_cache_latents is None:
            args.cache_latents = None  # not the dataset's default cache: the VAE trains
    if str(getattr(args, "cache_latents", None)).lower() == "none":
        args.cache_latents = None
    if getattr(args, "model_id", "absent") is None:
        args.model_id = "_".join(record.short_name for record in records)
    return args


# The model's settings: what SegmenterConfig records and test.py / demo.py read from checkpoints.
MODEL_FLAGS = ("model", "img_size", "token_length", "attn_grad", "no_target_area")


def check_args(parser, args, program):
    """Cheap consistency checks (no image is read); argparse errors naming the flag."""
    if hasattr(args, "datasets"):
        _check_datasets(parser, args, program)
    if getattr(args, "model_id", None) is not None and not is_plain_file_name(args.model_id):
        parser.error(f"argument --model_id: {args.model_id!r} is not a plain name (it names the "
                     f"checkpoint files in --output-dir and the log folder; no '/')")
    if getattr(args, "device", "auto") not in ("auto", "cpu", "cuda") and not str(
            args.device).startswith("cuda:"):
        parser.error(f"argument --device: expected auto, cpu, cuda or cuda:N, got {args.device!r}")
    if getattr(args, "random_weights", False) and args.sd_path is not None:
        parser.error("argument --random_weights: the weights would be random, --sd_path names "
                     "weights to read; give one of them")
    if getattr(args, "bn_group_size", None) and args.batch_size % args.bn_group_size:
        parser.error(f"argument --bn_group_size: {args.bn_group_size} does not divide --batch-size "
                     f"{args.batch_size}")
    if isinstance(getattr(args, "lr_scale", None), dict) and getattr(args, "model", None) is not None:
        groups = get_preset(args.model).recipe.groups
        unknown = sorted(set(args.lr_scale) - set(groups))
        if unknown:
            parser.error(f"argument --lr_scale: the {args.model} model has no optimizer group "
                         f"{', '.join(unknown)}; its groups: {', '.join(groups)}")
    if program == "train" and getattr(args, "cache_latents", None) and getattr(args, "model", None) \
            and "backbone.vae" not in get_preset(args.model).frozen_modules:
        parser.error(f"argument --cache_latents: the {args.model} model trains its VAE, so its "
                     f"latents change every step and cannot be cached; leave the flag out")
    if getattr(args, "frozen_bf16", False) and getattr(args, "model", None) \
            and not get_preset(args.model).frozen_modules:
        parser.error(f"argument --frozen_bf16: the {args.model} model has no frozen parts (its VAE "
                     f"and CLIP train); leave the flag out")
    if getattr(args, "frozen_bf16", False) and args.precision != "bf16":
        parser.error(f"argument --frozen_bf16: needs --precision bf16 (got {args.precision})")
    if program == "demo" and os.path.isdir(args.out):
        parser.error(f"argument --out: {args.out} is a folder; give a file name such as "
                     f"{os.path.join(args.out, 'overlay.png')}")
    if program == "predict":
        _check_predict_inputs(parser, args)


def _check_datasets(parser, args, program):
    """--dataset / --splitBy / --split / --no_target_area against the dataset catalog."""
    if len(args.datasets) > 1 and program != "train":
        parser.error(f"argument --dataset: {program} reads one dataset at a time; a joint "
                     f"model is evaluated on each, e.g. --dataset {args.datasets[0][0]}")
    if len(args.datasets) > 1 and args.splitBy:
        parser.error("argument --splitBy: in a joint list give each dataset's partition "
                     "after a colon, e.g. refcoco,refcocog:google")
    records = [get_dataset(dataset) for dataset, _ in args.datasets]
    if getattr(args, "no_target_area", None) and not all(record.generalized for record in records):
        generalized = [name for name in dataset_names() if get_dataset(name).generalized]
        parser.error(f"argument --no_target_area: only for datasets whose expressions may "
                     f"refer to nothing ({', '.join(generalized)}, or a jsonl: folder with "
                     f"no_target lines)")
    for record, (dataset, splitBy) in zip(records, args.datasets):
        if splitBy not in record.partitions:
            parser.error(f"argument --splitBy: {dataset} has no {splitBy!r} partition; "
                         f"expected one of {', '.join(record.partitions)}")
        if hasattr(args, "split"):
            allowed = record.held_out_splits(splitBy) + (["all"] if program == "test" else [])
            if args.split not in allowed:
                parser.error(f"argument --split: {dataset} ({splitBy}) has no held-out split "
                             f"{args.split!r}; expected one of {', '.join(allowed) or 'none'}")


def _check_predict_inputs(parser, args):
    """predict.py: one model source, one kind of input, an output folder."""
    if not args.checkpoint and not args.random_weights:
        parser.error("argument --checkpoint: the model to run is required (a checkpoint, a model "
                     "folder or a Hugging Face Hub repository id)")
    if args.checkpoint and args.random_weights:
        parser.error("argument --random_weights: it builds the model --model describes; --checkpoint "
                     "names one to read; give one of them")
    if (args.manifest is None) == (args.images is None):
        parser.error("argument --manifest/--images: give one of them (a JSONL manifest, or a "
                     "folder of images with --text)")
    if args.images is not None and not args.text:
        parser.error("argument --text: --images needs at least one --text expression")
    if args.manifest is not None and args.text:
        parser.error("argument --text: it is for --images; each manifest line lists its own sentences")
    if args.image_root is not None and args.manifest is None:
        parser.error("argument --image_root: it is for --manifest")
    if not args.out:
        parser.error("argument --out: the output folder is required")


def warn_ignored_flags(args):
    for flag, reason in IGNORED_VPD_FLAGS.items():
        value = getattr(args, flag.lstrip("-"), None)  # dest = the flag without its dashes
        if value not in (None, False):
            print(f"warning: {flag} is accepted for VPD's command lines but changes nothing here: "
                  f"{reason}", file=sys.stderr)


def parse_args(program, argv=None, description=None, parser=None):
    """Parse, fill defaults and check the flags of `program` (a key of PROGRAM_GROUPS). A program
    with flags of its own passes `parser` (from get_parser, with those flags added)."""
    parser = parser or get_parser(program, description)
    args = parser.parse_args(argv)
    warn_ignored_flags(args)
    # Programs that read a model take its settings from it, unless they build one (--random_weights).
    resolve_defaults(args, model_flags=program not in ("test", "demo", "app", "predict")
                     or getattr(args, "random_weights", False))
    check_args(parser, args, program)
    return args


# --------------------------------------------------------------------------- the model's identity
class ModelFlagError(InputError, ValueError):
    """A model flag that contradicts the checkpoint being loaded."""


def model_config(args):
    """train.py (and --random_weights): the SegmenterConfig the flags describe, with what they
    leave to the preset; its loss section from --dice_weight and --loss_weight (a program without
    them, which never computes a loss, gets the default: VPD's)."""
    loss = LossConfig.with_terms(dice=getattr(args, "dice_weight", 0.0), **dict(getattr(args, "loss_weight", ())))
    return complete_config(SegmenterConfig(preset=args.model, token_length=args.token_length,
                                           img_size=args.img_size, attn_grad=bool(args.attn_grad),
                                           no_target_area=args.no_target_area, sd_path=args.sd_path,
                                           clip_path=args.clip_path, loss=loss))


def reconcile_model_config(config, args, source):
    """test.py / demo.py: the checkpoint's config, with --sd_path / --clip_path applied (without
    them the recorded paths, then the preset's default). A model flag given explicitly must agree
    with the checkpoint (one-line error naming both values)."""
    fields = {"model": "preset", "img_size": "img_size", "token_length": "token_length",
              "attn_grad": "attn_grad", "no_target_area": "no_target_area"}
    for flag, field in fields.items():
        given = getattr(args, flag, None)
        if given is not None and given != getattr(config, field):
            raise ModelFlagError(f"--{flag} {given} contradicts {source}, which holds a model "
                                 f"with {flag} {getattr(config, field)}; leave the flag out (the "
                                 f"checkpoint decides) or load another checkpoint")
    return config.replace(sd_path=args.sd_path or config.sd_path,
                          clip_path=args.clip_path or config.clip_path)
