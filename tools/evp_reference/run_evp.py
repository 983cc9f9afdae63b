"""Reference outputs of EVP's own referring-segmentation code (Lavreniuk/EVP, refer/), at full size,
fp32, on CPU, with seeded random weights: the other side of tools/check_evp_equivalence.py.

Everything numeric comes from EVP's files as they are in WORKSPACE/EVP (and CompVis' ldm in
EVP/stable-diffusion, the commit EVP's submodule pins): the model is EVP's `EVPRefer`, built with
the arguments of EVP's refer/train.sh; the training step is EVP's `train_one_epoch`; the optimizer
groups and the scheduler are built by executing the statements of EVP's `main()` that build them
(read from refer/train.py at run time); the loss is EVP's `criterion`; the inputs go through EVP's
own transforms. The process-level patches this needs on a CPU without network are listed in
PATCHES below; none changes a number. Nothing of this repository is imported: the process runs on
EVP's import paths (it restarts itself with them, see `enter_workspace`).

Usage (README.md in this folder lays out WORKSPACE):
    python tools/evp_reference/run_evp.py --workspace WORKSPACE [--out DIR] [--threads 2]
        [--seed 0] [--init perturbed|evp] [--train_batch 1] [--iters_per_epoch 100]
        [--skip_train] [--skip_lr]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import resource
import sys
import time
import types

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# SD v1.5's text encoder config, shipped with this repository (read as a file, not imported).
CLIP_TEXT_CONFIG = os.path.join(REPO_ROOT, "models", "configs", "sd15", "text_encoder", "config.json")
OUT = None  # the output folder, set by main()
EVP_COMMIT = "591f1d281cdc797d0b510dd25e01af206476956b"
LDM_COMMIT = "21f890f9da3cfbeaba8e2ac3c425ee9e998d5229"  # EVP's stable-diffusion submodule pin
TAMING_COMMIT = "3ba01b241669f5ade541ce990f7650a3b8f65318"

# EVP's refer/train.sh for RefCOCO: `bash train.sh refcoco LOGDIR 2 --token_length 40` passes these
# to train.py (lines 6-8 of train.sh; ${@:4} = --token_length 40).
TRAIN_SH_ARGS = ["--dataset", "refcoco", "--model_id", "refcoco", "--batch-size", "3", "--lr", "8e-5",
                 "--wd", "1e-2", "--print-freq", "100", "--epochs", "20", "--img_size", "512",
                 "--token_length", "40"]

PATCHES = [
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder -> an empty nn.Module: LatentDiffusion builds it "
    "as its cond_stage_model (downloading openai/clip-vit-large-patch14) and EVPRefer deletes it at "
    "once (model.py:269); nothing of it reaches EVPRefer.",
    "transformers CLIPTextModel.from_pretrained(name) -> CLIPTextModel(CLIPTextConfig of SD v1.5's "
    "text encoder, models/configs/sd15/text_encoder/config.json of this repository): same architecture as "
    "openai/clip-vit-large-patch14's text model, random init instead of a download (model.py:280).",
    "torch.Tensor.cuda -> returns the tensor itself; torch.cuda.synchronize / empty_cache -> no-ops "
    "(train.py:53, 129-132, 145, 158-159 call them; there is no GPU). CPU fp32 throughout.",
    "sys.modules['wandb'] -> an empty module (train.py:21 imports it; only main() uses it).",
    "no DDP wrapper and no process group: one process, so SyncBatchNorm (still converted, "
    "train.py:190) runs as plain BatchNorm, which is what it computes for a world of one.",
    "optimizer.step() of the full-size model records the learning rates and does not update the "
    "weights (AdamW's two moment buffers would add 8.6 GB); the loss and gradients are computed "
    "before it, so they are unaffected. The lr schedule run calls the real loop with a stand-in model.",
    "gc.collect -> no-op during the lr schedule runs only (train.py:157; 0.5 s per call with the full "
    "model loaded, 2000 calls; it cannot change an lr).",
    "lr_schedule_timm054.*: timm's Scheduler.update_groups replaced by the behaviour of timm <= 0.5.4 "
    "(no lr_scale inside the scheduler), to show the schedule EVP's loop gives with the timm it may "
    "have been written against; lr_schedule.* uses the installed timm unpatched.",
]


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # ru_maxrss is KiB


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message} (peak RSS {rss_gb():.2f} GB)", flush=True)


# --------------------------------------------------------------------------------------- set-up
def workspace_paths(workspace: str) -> list[str]:
    """The import paths EVP's code needs, first: the extra packages (site/), EVP's repository root
    and refer/ (train.sh's path and train.py's working directory), LDM (EVP/stable-diffusion) and
    taming-transformers."""
    evp = os.path.join(workspace, "EVP")
    return [os.path.join(workspace, "site"), evp, os.path.join(evp, "refer"),
            os.path.join(evp, "stable-diffusion"), os.path.join(workspace, "taming-transformers")]


def enter_workspace(workspace: str) -> None:
    """Restart this process with EVP's import paths first on PYTHONPATH (unless they are already),
    then work in EVP/refer (EVPRefer loads './v1-inference.yaml', model.py:260)."""
    workspace = os.path.abspath(workspace)
    paths = workspace_paths(workspace)
    missing = [path for path in paths if not os.path.isdir(path)]
    if missing:
        sys.exit(f"error: {workspace} lacks {', '.join(missing)}; lay it out as "
                 f"tools/evp_reference/README.md says")
    current = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if current[:len(paths)] != paths:
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [p for p in current if p]))
        os.execve(sys.executable, [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]], environment)
    os.chdir(os.path.join(workspace, "EVP", "refer"))


def setup_patches():
    """The patches listed in PATCHES (the process already runs on EVP's import paths)."""
    import torch
    from torch import nn

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda *args, **kwargs: None

    import ldm.modules.encoders.modules as ldm_encoders

    class DeletedCondStage(nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

    ldm_encoders.FrozenCLIPEmbedder = DeletedCondStage

    from transformers.models.clip.modeling_clip import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_json_file(CLIP_TEXT_CONFIG)
    CLIPTextModel.from_pretrained = classmethod(lambda cls, *args, **kwargs: cls(config))

    # Last, once transformers is loaded (it probes for wandb by import spec).
    import importlib.machinery

    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    sys.modules.setdefault("wandb", wandb)


def evp_args():
    from args import get_parser  # EVP's refer/args.py

    return get_parser().parse_args(TRAIN_SH_ARGS)


def main_statements(train_module, first_target: str, last_target: str):
    """The statements of EVP's train.main() from the assignment of `first_target` to that of
    `last_target`, compiled from the source file (so what runs is EVP's text, not a copy)."""
    path = train_module.__file__
    tree = ast.parse(open(path).read(), filename=path)
    main_def = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")

    def assigns(statement, name):
        return isinstance(statement, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == name for target in statement.targets)

    body = main_def.body
    start = next(i for i, s in enumerate(body) if assigns(s, first_target))
    stop = next(i for i, s in enumerate(body) if assigns(s, last_target))
    block = ast.Module(body=body[start:stop + 1], type_ignores=[])
    lines = (body[start].lineno, body[stop].end_lineno)
    return compile(block, path, "exec"), lines


def build_optimizer_and_scheduler(train_module, single_model, args):
    """EVP's params_to_optimize, AdamW and CosineLRScheduler (train.py main(), lines 203-239)."""
    code, lines = main_statements(train_module, "lesslr_no_decay", "lr_scheduler")
    namespace = dict(vars(train_module))
    namespace.update(single_model=single_model, args=args)
    exec(code, namespace)
    return namespace["optimizer"], namespace["lr_scheduler"], namespace["params_to_optimize"], lines


# ---------------------------------------------------------------------------------------- model
def build_model(train_module, args, seed: int):
    """As train.py main() does (lines 186-190): EVPRefer with EVP's sd_path (absent here, so
    LDM's own random init), then SyncBatchNorm conversion. No .cuda(), no DDP."""
    import torch

    torch.manual_seed(seed)
    model = train_module.EVPRefer(sd_path="../checkpoints/v1-5-pruned-emaonly.ckpt",
                                  neck_dim=[320, 640 + args.token_length, 1280 + args.token_length, 1280])
    if os.path.exists("../checkpoints/v1-5-pruned-emaonly.ckpt"):
        raise RuntimeError("EVP/checkpoints/v1-5-pruned-emaonly.ckpt exists: EVPRefer would load it")
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def perturb_constant_tensors(model, seed: int) -> dict:
    """Replace every floating tensor of the state dict that holds one repeated value (LDM's
    zero-initialised output convolutions, norm weights 1 / biases 0, BN running stats, gamma = 1e-4)
    by seeded random values of a similar scale, so that no part of the model is an identity or a
    zero and every parameter's gradient is informative. Returns {rule: count}."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    counts = {}
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            value = tensor.flatten()[0].item()
            if not bool((tensor == value).all()):
                continue
            noise = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 2 - 1  # U(-1, 1)
            if name == "gamma":
                rule = "gamma: U(0.5, 1.5)"  # EVP's 1e-4 would hide the text adapter from the logits
                new = 1.0 + 0.5 * noise
            elif value == 0.0 and tensor.ndim >= 2:
                rule = "zero weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default bound)"
                fan_in = tensor[0].numel()
                new = noise / fan_in ** 0.5
            elif value == 0.0:
                rule = "zero vector (bias, running_mean): U(-0.1, 0.1)"
                new = 0.1 * noise
            else:
                rule = "constant c (norm weight, running_var): c * U(0.9, 1.1)"
                new = value * (1.0 + 0.1 * noise)
            tensor.copy_(new.to(tensor.dtype))
            counts[rule] = counts.get(rule, 0) + 1
    return counts


def calibrate_head(model, inputs) -> dict:
    """Random weights make the 2-class logits nearly constant over the image (the decoder's last 1x1
    conv sees a feature map with little spatial contrast), so every pixel takes one class and argmax
    agreement would test nothing. Rescale classifier.conv1_1 (a test-weight choice, not EVP code) so
    that the object-minus-background logit has unit spread over the eval images' 64x64 logits and
    median 0 (about half the pixels each class). One extra eval forward."""
    import torch

    head = model.classifier.conv1_1
    seen = {}
    hook = head.register_forward_hook(lambda module, args, output: seen.setdefault("x", args[0].detach()))
    model.eval()
    with torch.no_grad():
        model(inputs["images"], inputs["input_ids"])
        hook.remove()
        x = seen["x"]  # (B, hidden, 64, 64)
        w_diff = (head.weight[1] - head.weight[0]).flatten()
        spatial = torch.einsum("c,bchw->bhw", w_diff, x)
        scale = 1.0 / float(spatial.std())
        head.weight.mul_(scale)
        offset = -float((spatial * scale).median())
        head.bias[1] = head.bias[0] + offset
    return {"weight_scale": scale, "bias_1_minus_bias_0": offset}


# --------------------------------------------------------------------------------------- inputs
SENTENCES = [
    "the man in the red shirt standing on the left side",
    # long enough to be truncated at 40 tokens (38 BPE ids + start + end)
    "a small brown dog with a blue collar sitting next to the wooden bench in the park while two "
    "children play with a yellow ball behind it and a woman in a green coat walks past on the path",
]
TOKEN_SOT, TOKEN_EOT = 49406, 49407


def clip_token_ids(sentence: str, token_length: int):
    """What EVP's dataset gets from CLIPTokenizer(openai/clip-vit-large-patch14)(text, truncation=True,
    max_length=L, padding='max_length') (dataset_refer_clip.py:63-68): [SOT, bpe..., EOT] truncated to
    L with EOT kept last, padded with EOT (the tokenizer's pad token). BPE ids from open_clip's bundled
    vocabulary (the same BPE; the HF tokenizer files cannot be downloaded here)."""
    import torch
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer().encode(sentence)
    ids = [TOKEN_SOT] + bpe[: token_length - 2] + [TOKEN_EOT]
    input_ids = torch.full((1, token_length), TOKEN_EOT, dtype=torch.long)
    attention = torch.zeros((1, token_length), dtype=torch.long)
    input_ids[0, : len(ids)] = torch.tensor(ids)
    attention[0, : len(ids)] = 1
    return input_ids, attention, len(bpe)


def synthetic_image_and_mask(rng, width: int, height: int):
    """A smooth coloured picture with a few shapes, and the mask of one ellipse in it."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((height, width, 3))
    for channel in range(3):
        for _ in range(3):
            fx, fy, phase = rng.uniform(0.5, 4, size=2).tolist() + [rng.uniform(0, 2 * np.pi)]
            image[..., channel] += np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase)
    image = (image - image.min()) / (image.max() - image.min()) * 200 + 20
    for _ in range(4):  # rectangles
        x0, y0 = rng.integers(0, width - 60), rng.integers(0, height - 60)
        w, h = rng.integers(30, width // 3), rng.integers(30, height // 3)
        image[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, size=3)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    rx, ry = rng.uniform(0.1, 0.25) * width, rng.uniform(0.1, 0.25) * height
    mask = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    image[mask] = 0.6 * image[mask] + 0.4 * np.array(rng.uniform(0, 255, size=3))
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8)


def make_inputs(train_module, args, seed: int) -> dict:
    """Two RGB images (640x480 and 500x375) and their masks through EVP's get_transform (Resize to
    512x512, ToTensor, Normalize(0.5, 0.5)), as EVP's ReferDataset hands them over (mask as a PIL 'P'
    image, dataset_refer_clip.py:91-99); token ids as EVP's tokenizer call gives them."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    transform = train_module.get_transform(args)
    images, targets, sources, source_masks, ids, masks, bpe_lengths = [], [], [], [], [], [], []
    for (width, height), sentence in zip([(640, 480), (500, 375)], SENTENCES):
        array, mask = synthetic_image_and_mask(rng, width, height)
        annot = Image.fromarray(mask, mode="P")
        image, target = transform(Image.fromarray(array, mode="RGB"), annot)
        images.append(image)
        targets.append(target)
        sources.append(torch.from_numpy(array))
        source_masks.append(torch.from_numpy(mask))
        input_ids, attention, n_bpe = clip_token_ids(sentence, args.token_length)
        ids.append(input_ids)
        masks.append(attention)
        bpe_lengths.append(n_bpe)
    return {
        "images": torch.stack(images),  # (2, 3, 512, 512) float32 in [-1, 1]
        "targets": torch.stack(targets),  # (2, 512, 512) int64 in {0, 1}
        "input_ids": torch.cat(ids),  # (2, L) int64
        "attention_mask": torch.cat(masks),  # (2, L) int64 (EVP never passes it to the model)
        "sentences": SENTENCES,
        "bpe_lengths_before_truncation": bpe_lengths,
        "source_images": sources,  # uint8 HxWx3, before EVP's transform
        "source_masks": source_masks,  # uint8 HxW
        "token_length": args.token_length,
        "img_size": args.img_size,
    }


# ------------------------------------------------------------------------------------- evaluate
def evaluate(model, inputs) -> tuple[dict, dict]:
    """model.eval() + no_grad forward, as EVP's evaluate() (train.py:58-83) and test.py do, on both
    samples at once; forward hooks keep the intermediate tensors."""
    import torch

    captured = {}

    def keep(name, pick=lambda output: output):
        def hook(module, args, output):
            value = pick(output)
            captured[name] = [v.detach().clone() for v in value] if isinstance(value, list) else value.detach().clone()
        return hook

    hooks = [
        model.encoder_vq.quant_conv.register_forward_hook(keep("vae_moments")),
        model.clip_model.register_forward_hook(keep("clip_last_hidden_state", lambda o: o.last_hidden_state)),
        model.text_adapter.register_forward_hook(keep("text_context")),
        model.unet.register_forward_hook(keep("unet_features")),
        model.aggregation.register_forward_hook(keep("imafr_features")),
        model.classifier.register_forward_hook(keep("decoder_logits_64")),
    ]
    model.eval()
    with torch.no_grad():
        logits = model(inputs["images"], inputs["input_ids"])
    for hook in hooks:
        hook.remove()
    captured["latents_scaled"] = captured["vae_moments"][:, :4] / 4.7164
    return {"logits": logits}, captured


# ---------------------------------------------------------------------------------- train step
GRAD_PARAMETERS = [
    # UNet (LDM names): timestep path, a ResBlock conv, cross-attention key (text path), a transformer
    # output projection, the input conv
    "unet.unet.diffusion_model.time_embed.0.weight",
    "unet.unet.diffusion_model.input_blocks.0.0.weight",
    "unet.unet.diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "unet.unet.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    "unet.unet.diffusion_model.output_blocks.7.1.proj_out.weight",
    "unet.unet.diffusion_model.output_blocks.7.1.transformer_blocks.0.norm2.weight",
    # VAE encoder
    "encoder_vq.encoder.conv_in.weight",
    "encoder_vq.encoder.mid.attn_1.q.weight",
    "encoder_vq.quant_conv.weight",
    # CLIP text model
    "clip_model.text_model.embeddings.position_embedding.weight",
    "clip_model.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "clip_model.text_model.encoder.layers.11.mlp.fc2.weight",
    "clip_model.text_model.final_layer_norm.weight",
    # text adapter
    "gamma",
    "text_adapter.fc.0.weight",
    "text_adapter.fc.2.bias",
    # IMAFR neck
    "aggregation.layer1.spatial_attention.0.weight",
    "aggregation.layer2.conv1.weight",
    "aggregation.layer2.group_norm.weight",
    "aggregation.layer3.conv1.1.weight",
    "aggregation.layer6.channel_attention.1.weight",
    "aggregation.layer7.conv1.0.weight",
    # decoder
    "classifier.conv2_2.weight",
    "classifier.bn1_4.weight",
    "classifier.conv1_1.weight",
    "classifier.conv1_1.bias",
]


class RecordingStep:
    """Stands in for optimizer.step: records the lr of every group at each call."""

    def __init__(self, optimizer, update: bool):
        self.optimizer, self.update, self.lrs = optimizer, update, []
        self.real_step = optimizer.step

    def __call__(self, *args, **kwargs):
        self.lrs.append([group["lr"] for group in self.optimizer.param_groups])
        if self.update:
            return self.real_step(*args, **kwargs)
        return None


def train_step(train_module, model, args, inputs, batch_indices, update_weights: bool) -> dict:
    """One iteration of EVP's train_one_epoch (train.py:117-159) on a one-batch loader: model.train(),
    forward, EVP's criterion, zero_grad, backward, step, scheduler step at epoch 0 + 1/1, lr scales."""
    import torch

    optimizer, scheduler, groups, lines = build_optimizer_and_scheduler(train_module, model, args)
    recorder = RecordingStep(optimizer, update_weights)
    optimizer.step = recorder
    seen = {}

    def criterion(output, target):
        loss = train_module.criterion(output, target)
        seen["logits"] = output.detach().clone()
        seen["loss"] = loss.detach().clone()
        return loss

    index = torch.tensor(batch_indices)
    batch = (inputs["images"][index], inputs["targets"][index],
             inputs["input_ids"][index].unsqueeze(1), inputs["attention_mask"][index].unsqueeze(1))
    train_module.train_one_epoch(model, criterion, optimizer, [batch], scheduler, 0, args.print_freq, 0)

    named = dict(model.named_parameters())
    grads = {name: named[name].grad.detach().clone() for name in GRAD_PARAMETERS}
    stats = {}
    for name, parameter in named.items():
        grad = parameter.grad
        stats[name] = None if grad is None else {
            "norm": float(grad.double().norm()), "sum": float(grad.double().sum()),
            "abs_max": float(grad.abs().max())}
    running = {name: buffer.detach().clone() for name, buffer in model.named_buffers()
               if name.startswith("classifier.") and ("running" in name or "num_batches" in name)}
    return {
        "loss": float(seen["loss"]),
        "loss_tensor": seen["loss"],
        "train_mode_logits": seen["logits"],
        "batch_indices": list(batch_indices),
        "grads": grads,
        "grad_stats": stats,
        "bn_buffers_after_step": running,
        "lrs_at_step": recorder.lrs,
        "lrs_after_scheduler_and_scale": [group["lr"] for group in optimizer.param_groups],
        "weights_updated": update_weights,
        "optimizer_source_lines": lines,
    }


def optimizer_groups(train_module, model, args) -> dict:
    optimizer, scheduler, groups, lines = build_optimizer_and_scheduler(train_module, model, args)
    group_of = {}
    for index, group in enumerate(optimizer.param_groups):
        for parameter in group["params"]:
            group_of[id(parameter)] = index
    rows = []
    for name, parameter in model.named_parameters():
        index = group_of.get(id(parameter))
        group = optimizer.param_groups[index] if index is not None else {}
        rows.append({"name": name, "group": index, "weight_decay": group.get("weight_decay"),
                     "lr_scale": group.get("lr_scale"), "initial_lr": group.get("initial_lr"),
                     "lr_now": group.get("lr"), "requires_grad": parameter.requires_grad,
                     "numel": parameter.numel()})
    summary = [{"group": i, "tensors": len(g["params"]), "numel": sum(p.numel() for p in g["params"]),
                "weight_decay": g["weight_decay"], "lr_scale": g.get("lr_scale"), "lr": g["lr"],
                "initial_lr": g.get("initial_lr"), "betas": list(g["betas"]), "eps": g["eps"],
                "amsgrad": g["amsgrad"]} for i, g in enumerate(optimizer.param_groups)]
    return {"source": f"refer/train.py lines {lines[0]}-{lines[1]} (main), executed on EVPRefer",
            "group_names": ["lesslr_no_decay", "lesslr_decay", "no_lr", "no_decay", "decay"],
            "groups": summary, "parameters": rows}


# ------------------------------------------------------------------------------- lr schedule
def timm_054_update_groups(self, values):
    """timm <= 0.5.4's Scheduler.update_groups (behaviour restated, not copied): every group's lr is
    set to the scheduled value; from timm 0.6 on, groups holding 'lr_scale' get value * lr_scale."""
    if not isinstance(values, (list, tuple)):
        values = [values] * len(self.optimizer.param_groups)
    for group, value in zip(self.optimizer.param_groups, values):
        group[self.param_group_field] = value


def lr_schedule(train_module, model, args, iters_per_epoch: int, timm_054: bool = False):
    """Run EVP's train_one_epoch for every epoch with a stand-in model (the lr does not depend on
    the model) and EVP's optimizer/scheduler built on the full EVPRefer; record the lr of each group
    at every optimizer step. gc.collect() (train.py:157) is a no-op meanwhile: with the full model
    loaded it costs 0.5 s per iteration and has no effect on the lr. timm_054: the scheduler's
    update_groups behaves as in timm <= 0.5.4 (no lr_scale inside the scheduler)."""
    import gc

    from timm.scheduler.scheduler import Scheduler

    installed_update_groups, collect = Scheduler.update_groups, gc.collect
    if timm_054:
        Scheduler.update_groups = timm_054_update_groups
    gc.collect = lambda *args, **kwargs: 0
    try:
        return _lr_schedule(train_module, model, args, iters_per_epoch, timm_054)
    finally:
        Scheduler.update_groups, gc.collect = installed_update_groups, collect


def _lr_schedule(train_module, model, args, iters_per_epoch: int, timm_054: bool):
    import torch
    from torch import nn

    for parameter in model.parameters():
        parameter.grad = None
    optimizer, scheduler, groups, lines = build_optimizer_and_scheduler(train_module, model, args)
    recorder = RecordingStep(optimizer, update=False)
    optimizer.step = recorder

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, image, sentences):
            return self.conv(image)

    stand_in = StandIn()
    batch = (torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long),
             torch.zeros(1, 1, args.token_length, dtype=torch.long),
             torch.ones(1, 1, args.token_length, dtype=torch.long))
    loader = [batch] * iters_per_epoch
    epochs_t = []
    real_step = scheduler.step

    def scheduler_step(epoch, *a, **k):
        epochs_t.append(epoch)
        return real_step(epoch, *a, **k)

    scheduler.step = scheduler_step
    for epoch in range(args.epochs):  # train.py:259-262 (no resume)
        train_module.train_one_epoch(stand_in, train_module.criterion, optimizer, loader, scheduler, epoch,
                                     args.print_freq, 0)
    lrs = torch.tensor(recorder.lrs, dtype=torch.float64)  # (epochs * iters, groups)
    total = lrs.shape[0]
    points = {"iteration 0": 0, "iteration 1 epoch": iters_per_epoch, "mid-run": total // 2, "last": total - 1}
    scales = [g.get("lr_scale") for g in optimizer.param_groups]
    report = {
        "iters_per_epoch": iters_per_epoch, "epochs": args.epochs, "total_iterations": total,
        "base_lr": args.lr, "scheduler": "timm.scheduler.CosineLRScheduler(optimizer, t_initial=epochs, "
        "lr_min=1e-7, warmup_t=1, warmup_lr_init=1e-7, warmup_prefix=True), stepped after each "
        "iteration with epoch + its/len(loader); then lr *= lr_scale for groups with lr_scale",
        "timm_update_groups": ("as timm <= 0.5.4: the scheduler sets the scheduled value, so lr_scale "
                               "is applied once (by EVP's loop)") if timm_054 else (
            "installed timm (>= 0.6.5 behaviour): the scheduler already multiplies groups holding "
            "lr_scale, and EVP's loop multiplies again: lr_scale**2 after every step, lr_scale once at "
            "iteration 0 (set by the scheduler's constructor)"),
        "group_names": ["lesslr_no_decay", "lesslr_decay", "no_lr", "no_decay", "decay"],
        "group_lr_scale": scales,
        "definition": "lr of each group used by optimizer.step() at that 0-based iteration; the "
                      "scheduler value that set it was computed at scheduler_t (None: constructor)",
        "points": {},
        "lr_after_last_step": [g["lr"] for g in optimizer.param_groups],
    }
    for label, iteration in points.items():
        t = None if iteration == 0 else epochs_t[iteration - 1]
        report["points"][label] = {
            "iteration": iteration, "scheduler_t": t,
            "lr_per_group": lrs[iteration].tolist(),
            "timm_value_unscaled": (scheduler._get_lr(t)[0] if t is not None else scheduler.warmup_lr_init),
            "lr_over_timm_value": [lr / (scheduler._get_lr(t)[0] if t is not None else scheduler.warmup_lr_init)
                                   for lr in lrs[iteration].tolist()],
        }
    return report, {"lrs": lrs, "scheduler_t": torch.tensor(epochs_t, dtype=torch.float64)}


# ------------------------------------------------------------------------------------------ main
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", required=True,
                        help="folder holding EVP/ (with EVP/stable-diffusion/), taming-transformers/ "
                             "and site/ (README.md in this folder)")
    parser.add_argument("--out", default=None, help="output folder (default: WORKSPACE/out)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init and the inputs")
    parser.add_argument("--init", choices=["perturbed", "evp"], default="perturbed",
                        help="perturbed: EVP/LDM's random init, then constant tensors (zero convs, norm "
                             "affine, BN stats, gamma) replaced by seeded random values and the last 1x1 "
                             "conv rescaled so both classes occur; evp: as built")
    parser.add_argument("--train_batch", type=int, default=1, choices=[1, 2],
                        help="samples in the training step (2 needs ~5 GB more)")
    parser.add_argument("--iters_per_epoch", type=int, default=100)
    parser.add_argument("--update_weights", action="store_true",
                        help="let the training step's AdamW update the weights (+8.6 GB)")
    parser.add_argument("--skip_train", action="store_true")
    parser.add_argument("--skip_lr", action="store_true")
    parser.add_argument("--skip_checkpoint", action="store_true", help="do not write evp_random.pth")
    options = parser.parse_args()

    global OUT
    OUT = os.path.abspath(options.out or os.path.join(options.workspace, "out"))
    started = time.time()
    os.makedirs(OUT, exist_ok=True)
    enter_workspace(options.workspace)
    setup_patches()
    import torch

    torch.set_num_threads(options.threads)
    import timm
    import transformers

    import train as evp_train  # EVP's refer/train.py (nothing runs at import)

    summary = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "options": vars(options),
               "evp_commit": EVP_COMMIT, "ldm_commit": LDM_COMMIT, "taming_commit": TAMING_COMMIT,
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "timm": timm.__version__},
               "patches": PATCHES, "phases": {}}

    def phase(name, start):
        summary["phases"][name] = {"seconds": round(time.time() - start, 1), "peak_rss_gb": round(rss_gb(), 2)}
        log(f"{name} done in {time.time() - start:.1f} s")

    args = evp_args()
    summary["evp_args"] = vars(args)

    t = time.time()
    model = build_model(evp_train, args, options.seed)
    summary["perturbed"] = perturb_constant_tensors(model, options.seed + 1) if options.init == "perturbed" else {}
    phase("build", t)

    t = time.time()
    inputs = make_inputs(evp_train, args, options.seed)
    torch.save(inputs, os.path.join(OUT, "inputs.pt"))
    phase("inputs", t)

    if options.init == "perturbed":
        t = time.time()
        summary["head_calibration"] = calibrate_head(model, inputs)
        phase("head_calibration", t)

    if not options.skip_checkpoint:
        t = time.time()
        optimizer, scheduler, _, _ = build_optimizer_and_scheduler(evp_train, model, args)
        checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0,
                      "args": args, "lr_scheduler": scheduler.state_dict()}  # train.py:272-274
        torch.save(checkpoint, os.path.join(OUT, "evp_random.pth"))
        with open(os.path.join(OUT, "state_dict_keys.txt"), "w") as handle:
            for key, value in checkpoint["model"].items():
                handle.write(f"{key}\t{tuple(value.shape)}\t{str(value.dtype).removeprefix('torch.')}\n")
        del checkpoint, optimizer, scheduler
        phase("checkpoint", t)

    t = time.time()
    groups = optimizer_groups(evp_train, model, args)
    with open(os.path.join(OUT, "optimizer_groups.json"), "w") as handle:
        json.dump(groups, handle, indent=1)
    phase("optimizer_groups", t)

    t = time.time()
    outputs, intermediates = evaluate(model, inputs)
    torch.save(outputs, os.path.join(OUT, "eval_logits.pt"))
    torch.save(intermediates, os.path.join(OUT, "eval_intermediates.pt"))
    logits = outputs["logits"]
    summary["eval"] = {"logits_shape": list(logits.shape), "abs_max": float(logits.abs().max()),
                       "std": float(logits.std()),
                       "foreground_share": float((logits.argmax(1) == 1).float().mean())}
    phase("eval_forward", t)

    if not options.skip_train:
        t = time.time()
        indices = list(range(options.train_batch))
        result = train_step(evp_train, model, args, inputs, indices, options.update_weights)
        torch.save(result, os.path.join(OUT, "train_step.pt"))
        summary["train"] = {"loss": result["loss"], "batch_indices": indices,
                            "lrs_at_step": result["lrs_at_step"],
                            "lrs_after_scheduler_and_scale": result["lrs_after_scheduler_and_scale"],
                            "tensors_without_grad": sorted(n for n, s in result["grad_stats"].items() if s is None)}
        del result
        phase("train_step", t)

    if not options.skip_lr:
        for timm_054, suffix in ((False, ""), (True, "_timm054")):
            t = time.time()
            report, trajectory = lr_schedule(evp_train, model, args, options.iters_per_epoch, timm_054)
            with open(os.path.join(OUT, f"lr_schedule{suffix}.json"), "w") as handle:
                json.dump(report, handle, indent=1)
            torch.save(trajectory, os.path.join(OUT, f"lr_schedule{suffix}.pt"))
            summary[f"lr_schedule{suffix}"] = {k: v["lr_per_group"] for k, v in report["points"].items()}
            phase(f"lr_schedule{suffix}", t)

    summary["total_seconds"] = round(time.time() - started, 1)
    summary["peak_rss_gb"] = round(rss_gb(), 2)
    with open(os.path.join(OUT, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    log(f"all done in {summary['total_seconds']} s")


if __name__ == "__main__":
    main()
