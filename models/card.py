"""The model card: the README.md that makes a model folder a Hugging Face Hub repository as it is.

A card is YAML metadata (library, task, license, base model, the validation results as a
model-index) followed by Markdown: the architecture, how the weights were trained (from the
training checkpoint's record: data, recipe, the best epoch and its validation metrics) and how to
load them. It is written with huggingface_hub's `ModelCard` / `ModelCardData`, by the one folder
writer (models/pretrained.py `write_model_folder`), for every folder: `save_pretrained`,
`push_to_hub` and tools/export_model.py alike.
"""

from __future__ import annotations

import os

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import SegmenterConfig
from .registry import get_preset

__all__ = ["CARD_NAME", "LIBRARY_NAME", "PIPELINE_TAG", "model_card", "training_record"]

CARD_NAME = "README.md"
LIBRARY_NAME = "vpd-ris"  # this repository's package (pyproject.toml)
PIPELINE_TAG = "image-segmentation"
TAGS = ("referring-image-segmentation", "referring-expression-segmentation", "vpd")
PAPER = "https://arxiv.org/abs/2303.02153"
# The recipe's entries as the card names them: the checkpoint's schedule or args key -> label.
RECIPE_FIELDS = {
    "epochs": "epochs", "batch_size": "images per process", "processes": "processes",
    "accum_steps": "accumulation steps", "lr": "AdamW learning rate", "wd": "weight decay",
    "weight_decay_rule": "weight decay rule", "unet_lr_scale": "UNet lr scale",
    "warmup_epochs": "warm-up epochs", "dice_weight": "Dice loss weight", "precision": "precision",
    "seed": "seed",
}
# Metrics of a validation row shown in the card's table, in this order; others are left out.
SHOWN_METRICS = ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "oIoU", "mIoU",
                 "gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.8", "Pr@0.9")

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A referring image segmenter: given an image and an expression ("the man in the red shirt on the
left"), it predicts the mask of the object the expression refers to. It re-implements VPD
([Zhao et al., ICCV 2023]({{ paper }})): a diffusion UNet, run once at timestep 1 on the VAE latent
of the image and conditioned on the expression's CLIP text embedding refined by a small text
adapter, gives multi-scale features and cross-attention maps; a light decoder turns them into the
mask.

## Architecture

{{ architecture }}

## Training

{{ training }}

## How to use it

{{ usage }}

## License

{{ license_note }}
"""


def training_record(checkpoint: dict) -> dict:
    """What a training checkpoint records about how its weights were trained (the keys it has):
    `data` (datasets, partition, the validation split), `recipe`, `epochs_done`, and `best`
    (epoch, metric, score and, from checkpoints that keep it, the validation results by dataset)."""
    args = checkpoint.get("args") or {}
    schedule = checkpoint.get("schedule") or {}
    record = {}
    if args.get("dataset"):
        record["data"] = {"dataset": str(args["dataset"]), "splitBy": args.get("splitBy"),
                          "split": args.get("split")}
    recipe = {key: schedule.get(key, args.get(key)) for key in RECIPE_FIELDS}
    recipe = {key: value for key, value in recipe.items() if value is not None}
    if recipe:
        record["recipe"] = recipe
    if isinstance(checkpoint.get("epoch"), int):
        record["epochs_done"] = checkpoint["epoch"]
    best = checkpoint.get("best")
    if isinstance(best, dict) and best.get("epoch", -1) >= 0:
        record["best"] = {"epoch": best["epoch"] + 1, "metric": best.get("metric"), "score": best.get("score")}
        if isinstance(best.get("val"), dict):
            record["best"]["val"] = {name: {metric: row[metric] for metric in SHOWN_METRICS if metric in row}
                                     for name, row in best["val"].items() if isinstance(row, dict)}
    return record


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _architecture(config: SegmenterConfig, weights_count: int | None) -> str:
    preset = get_preset(config.preset)
    lines = [f"- preset `{config.preset}`: {preset.description}",
             f"- input {config.img_size} x {config.img_size} px; expressions of up to {config.token_length} "
             f"CLIP tokens (start and end included; longer ones are cut)",
             f"- decoder width {config.decoder_hidden}; cross-attention maps "
             f"{'with' if config.attn_grad else 'without'} gradient in training"]
    if config.no_target_area > 0:
        lines.append(f"- a mask covering at most {config.no_target_area:g} of the image counts as "
                     f"\"no target\" (emptied)")
    if preset.weights is not None:
        lines.append(f"- its frozen parts ({', '.join(preset.reloaded_modules)}) are not stored here: they come "
                     f"from {preset.weights.what}, {preset.weights.layouts}; pass `sd_path=` "
                     f"(`--sd_path`) when loading")
    if weights_count is not None:
        lines.append(f"- {weights_count / 1e6:.2f} M parameters stored (`model.safetensors`); the full "
                     f"config in `config.json`")
    return "\n".join(lines)


def _training(record: dict | None) -> str:
    if not record:
        return ("Not recorded: this folder was written from a model, not from a training checkpoint "
                "(`python tools/export_model.py CHECKPOINT DIR` writes the training record too).")
    parts = []
    data = record.get("data")
    if data:
        partition = f" ({data['splitBy']})" if data.get("splitBy") else ""
        split = f"; validated on its {data['split']} split after every epoch" if data.get("split") else ""
        parts.append(f"Data: `{data['dataset']}`{partition}, train split{split}.")
    recipe = record.get("recipe")
    if recipe:
        parts.append("Recipe: " + ", ".join(f"{RECIPE_FIELDS[key]} {_number(value)}"
                                            for key, value in recipe.items()) + ".")
    if "epochs_done" in record:
        parts.append(f"Epochs trained: {record['epochs_done']}.")
    best = record.get("best")
    if best:
        score = f" ({best['metric']} {best['score']:.2f})" if best.get("score") is not None else ""
        parts.append(f"These weights are the best epoch's: epoch {best['epoch']}{score}.")
        val = best.get("val") or {}
        metrics = [metric for metric in SHOWN_METRICS if any(metric in row for row in val.values())]
        if metrics:
            split = (data or {}).get("split") or "validation"
            table = [f"Validation results of epoch {best['epoch']} ({split} split, %):", "",
                     "| dataset | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
            table += [f"| {name} | " + " | ".join(f"{row[m]:.2f}" if m in row else "-" for m in metrics) + " |"
                      for name, row in val.items()]
            parts.append("\n".join(table))
    return "\n\n".join(parts)


def _usage(config: SegmenterConfig, repo_id: str) -> str:
    preset = get_preset(config.preset)
    needs_weights = preset.weights is not None
    sd = ', sd_path="./stable-diffusion-v1-5"' if needs_weights else ""
    flag = " --sd_path ./stable-diffusion-v1-5" if needs_weights else ""
    return f"""With this model's code installed (its repository's `pip install -r requirements.txt`):

```python
from engine.inference import ReferringSegmenter

segmenter = ReferringSegmenter.from_pretrained("{repo_id}"{sd})
masks = segmenter("image.jpg", ["the man in the red shirt"])  # (1, H, W) bool
segmenter.overlay("image.jpg", masks, ["the man in the red shirt"]).save("overlay.png")
```

Masks for a folder of images (PNG masks, COCO RLE in `predictions.jsonl`):

```
python predict.py --checkpoint {repo_id}{flag} --images photos/ --text "the dog" --out masks/
```

A Hub repository id resolves through the Hugging Face cache (offline with `HF_HUB_OFFLINE=1` once
it is there); a local copy of this folder loads the same way."""


def _license_note(config: SegmenterConfig) -> str:
    weights = get_preset(config.preset).weights
    if weights is None:
        return ("No third-party weights: every part of this preset was trained from scratch or is "
                "randomly initialised in the repository that made it.")
    if weights.license is None:
        return f"The weights derive from {weights.what}; its license applies to them."
    return (f"The UNet here is fine-tuned from {weights.what}, released under the `{weights.license}` "
            f"license; its use-based restrictions apply to this model as a derivative and must be "
            f"passed on with it. The frozen parts come from your own copy of {weights.what} and stay "
            f"under its license.")


def model_card(config: SegmenterConfig, name: str, record: dict | None = None,
               weights_count: int | None = None) -> ModelCard:
    """The card of a model folder: `config` the model's, `name` what it is loaded by (a Hub
    repository id, or the folder's path), `record` its `training_record` (None: not known),
    `weights_count` the number of stored parameters."""
    preset = get_preset(config.preset)
    config = preset.complete(config)
    weights = preset.weights
    title = os.path.basename(os.path.normpath(name))
    best = (record or {}).get("best") or {}
    data = (record or {}).get("data") or {}
    eval_results = []
    for dataset, row in (best.get("val") or {}).items():
        for metric, value in row.items():
            eval_results.append(EvalResult(
                task_type=PIPELINE_TAG, task_name="Referring image segmentation", dataset_type=dataset,
                dataset_name=f"{dataset} ({data.get('splitBy') or 'default'} partition)",
                dataset_split=data.get("split") or "val", metric_type=metric, metric_name=metric,
                metric_value=round(float(value), 4)))
    card_data = ModelCardData(
        library_name=LIBRARY_NAME, pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS) + [f"preset-{config.preset}"], license=weights.license if weights else None,
        base_model=weights.hub_id if weights else None,
        model_name=title if eval_results else None, eval_results=eval_results or None)
    return ModelCard.from_template(
        card_data, template_str=TEMPLATE, title=title, paper=PAPER,
        architecture=_architecture(config, weights_count), training=_training(record),
        usage=_usage(config, name), license_note=_license_note(config))
