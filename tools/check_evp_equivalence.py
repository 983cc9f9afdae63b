"""Check the `evp` preset against EVP's own code: the reference outputs of EVP's `EVPRefer`
(tools/evp_reference/, run from EVP's and CompVis' ldm code) against this repository's model, at
full size, fp32, on the CPU, with the same seeded random weights passed through EVP's checkpoint
format and the same images and token ids.

    python tools/check_evp_equivalence.py --reference DIR [--threads 2] [--json OUT]

DIR holds what tools/evp_reference/run_evp.py writes: evp_random.pth (EVP's checkpoint format),
inputs.pt, eval_logits.pt, eval_intermediates.pt, train_step.pt, optimizer_groups.json,
lr_schedule.pt. Checked, each with its tolerance (exit status 1 when one fails):

1. loading: evp_random.pth through the one load path (`VPDSegmenter.from_pretrained`): 0 missing,
   0 unexpected (the tensors EVP has and never runs are reported as ignored);
2. evaluation: logits max|d| <= 1e-3 and argmax agreement >= 99.99 %; the intermediates (VAE
   moments, CLIP output, adapter output, UNet features with the maps, neck output, decoder logits)
   are printed to locate a difference;
3. one training step (train mode, sample 0, EVP's loss): the loss to 1e-3, and the gradients of the
   26 parameters EVP's run recorded, each to 1e-3 or, where further, no further from EVP's than
   from our own step rerun with the UNet features moved at the size of fp32 rounding
   (--sensitivity: at batch 1, through the decoder's six train-mode BatchNorms, rounding grows
   in the backward pass to ~1 % of a gradient, in either implementation);
4. the optimizer: every tensor's weight decay and lr scale against EVP's `params_to_optimize`,
   tensor by tensor (EVP's 0.01 is applied twice by its code with timm >= 0.6.5: 1e-4 after the
   first step, models/presets/evp.py);
5. the learning rate of every group at every iteration of EVP's 20 x 100-iteration run
   (lr_schedule.pt; iterations 0, 100, 1000 and 1999 printed), relative difference <= 1e-9.

Memory: about 12 GiB (the training step runs with gradient checkpointing, which computes the same
numbers; --no-grad_checkpoint needs ~5 GiB more).
"""
import argparse
import datetime
import json
import os
import resource
import time
import warnings

import torch

from bench.common import command_line, device_name, library_versions
from engine.training import weight_decay_rule
from models import VPDSegmenter, get_preset
from models.weights import convert_evp_state_dict
from utils.logging import run_cli
from utils.optim import build_optimizer, build_scheduler, parameter_groups

LOGIT_TOLERANCE = 1e-3
ARGMAX_AGREEMENT = 99.99  # per cent
LR_TOLERANCE = 1e-9  # relative


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def difference(ours, theirs):
    ours, theirs = ours.detach().double(), theirs.detach().double().reshape(ours.shape)
    delta = float((ours - theirs).abs().max())
    scale = float(theirs.abs().max())
    return {"max_abs": delta, "relative": delta / scale if scale else delta, "their_abs_max": scale}


def our_names(evp_names, model):
    """EVP's parameter names (all of them: the UNet's converter needs the whole UNet) -> ours,
    None where we have no such tensor, through the conversion the loader uses (each name carries
    its index through it)."""
    indices = {name: torch.tensor([float(index)]) for index, name in enumerate(evp_names)}
    unet, vae = model.backbone.unet, model.backbone.vae
    converted, _ = convert_evp_state_dict(indices, unet.config, vae.config)
    by_index = {int(value.item()): name for name, value in converted.items()}
    own = dict(model.named_parameters())
    return {name: by_index.get(index) if by_index.get(index) in own else None
            for index, name in enumerate(evp_names)}


# ------------------------------------------------------------------------------------ the checks
def check_load(path):
    model, report = VPDSegmenter.from_pretrained(path, with_report=True)
    log(f"loaded {path}: {report}")
    return model, {"missing": len(report.missing), "unexpected": len(report.unexpected),
                   "ignored": report.ignored, "layout": report.layout, "config": model.config.to_dict(),
                   "ok": not report.missing and not report.unexpected}


def check_eval(model, inputs, reference_dir):
    captured = {}

    def keep(name, pick=lambda output: output):
        def hook(module, args, output):
            captured[name] = pick(output)
        return hook

    pre_neck = model.neck.register_forward_pre_hook(lambda module, args: captured.setdefault("unet_features", args[0]))
    hooks = [pre_neck,
             model.backbone.vae.quant_conv.register_forward_hook(keep("vae_moments")),
             model.text_encoder.register_forward_hook(keep("clip_last_hidden_state")),
             model.text_adapter.register_forward_hook(keep("text_context")),
             model.neck.register_forward_hook(keep("imafr_features")),
             model.decoder.classifier.register_forward_hook(keep("decoder_logits_64"))]
    model.eval()
    with torch.no_grad():
        logits = model(inputs["input_ids"], images=inputs["images"])
    for hook in hooks:
        hook.remove()
    reference = torch.load(os.path.join(reference_dir, "eval_logits.pt"))["logits"]
    intermediates = torch.load(os.path.join(reference_dir, "eval_intermediates.pt"))
    result = {"logits": difference(logits, reference),
              "argmax_agreement_percent": 100 * float((logits.argmax(1) == reference.argmax(1)).double().mean()),
              "intermediates": {}}
    for name, ours in captured.items():
        theirs = intermediates[name]
        if isinstance(ours, (list, tuple)):
            for level, (o, t) in enumerate(zip(ours, theirs)):
                result["intermediates"][f"{name}[c{level + 1}]"] = difference(o, t)
        else:
            result["intermediates"][name] = difference(ours, theirs)
    result["ok"] = (result["logits"]["max_abs"] <= LOGIT_TOLERANCE
                    and result["argmax_agreement_percent"] >= ARGMAX_AGREEMENT)
    return result


def train_step(model, inputs, index, names, perturbation=0.0):
    """One training step's loss, logits and the gradients of `names` (ours); `perturbation` > 0
    moves the UNet features (the neck's input) by up to that fraction of their largest value,
    uniformly and seeded: the size of fp32 rounding differences between two implementations."""
    def perturb(module, args):
        generator = torch.Generator().manual_seed(0)
        return ([f + perturbation * f.abs().max() * (2 * torch.rand(f.shape, generator=generator) - 1)
                 for f in args[0]],)

    hook = model.neck.register_forward_pre_hook(perturb) if perturbation else None
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(inputs["input_ids"][index], images=inputs["images"][index])
    loss = model.loss(logits, inputs["targets"][index])
    loss.backward()
    if hook is not None:
        hook.remove()
    own = dict(model.named_parameters())
    grads = {name: own[name].grad.detach().clone() for name in names}
    model.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach(), grads


def cosine(a, b):
    a, b = a.double().flatten(), b.double().reshape(a.shape).flatten()
    return float(a @ b / (a.norm() * b.norm()))


def check_train_step(model, inputs, reference_dir, grad_checkpoint, names, perturbation):
    reference = torch.load(os.path.join(reference_dir, "train_step.pt"), weights_only=False)
    index = torch.tensor(reference["batch_indices"])
    if grad_checkpoint:
        model.enable_gradient_checkpointing()
    ours_of = {evp_name: names[evp_name] for evp_name in reference["grads"]}
    loss, logits, grads = train_step(model, inputs, index, list(ours_of.values()))
    gradients = {evp_name: {"ours": name, **difference(grads[name], reference["grads"][evp_name]),
                            "cosine": cosine(grads[name], reference["grads"][evp_name])}
                 for evp_name, name in ours_of.items()}
    result = {"loss": {"ours": float(loss), "theirs": reference["loss"],
                       "abs_diff": abs(float(loss) - reference["loss"])},
              "train_logits": difference(logits, reference["train_mode_logits"]),
              "gradients": gradients, "grad_checkpoint": grad_checkpoint}
    within = {name: g["max_abs"] <= LOGIT_TOLERANCE for name, g in gradients.items()}
    if perturbation:
        # Our own step again, the UNet features moved at the size of the eval-mode difference to
        # EVP's: how far fp32 rounding alone carries the train-mode logits and the gradients.
        loss_p, logits_p, grads_p = train_step(model, inputs, index, list(ours_of.values()), perturbation)
        result["sensitivity"] = {
            "perturbation": perturbation, "loss_abs_diff": abs(float(loss_p) - float(loss)),
            "train_logits": difference(logits_p, logits),
            "gradients": {evp_name: {**difference(grads_p[name], grads[name]), "cosine": cosine(grads_p[name], grads[name])}
                          for evp_name, name in ours_of.items()}}
        # A gradient further from EVP's than 1e-3 passes when it is no further than the perturbed
        # run of ours is from ours: within what fp32 rounding alone moves it.
        within = {name: ok or gradients[name]["max_abs"] <= result["sensitivity"]["gradients"][name]["max_abs"]
                  for name, ok in within.items()}
    result["gradients_within_tolerance"] = sum(g["max_abs"] <= LOGIT_TOLERANCE for g in gradients.values())
    result["gradients_within_tolerance_or_sensitivity"] = sum(within.values())
    result["ok"] = result["loss"]["abs_diff"] <= LOGIT_TOLERANCE and all(within.values())
    return result


def our_optimizer(model, base_lr):
    recipe = get_preset(model.config.preset).recipe
    optimizer = build_optimizer(model, base_lr, recipe.weight_decay, recipe.lr_scales, fused=False,
                                decays=weight_decay_rule(model, recipe.weight_decay_rule),
                                group_of=recipe.group_of)
    return recipe, optimizer


def check_groups(model, reference, names):
    recipe = get_preset(model.config.preset).recipe
    groups = parameter_groups(model, recipe.weight_decay, recipe.lr_scales,
                              decays=weight_decay_rule(model, recipe.weight_decay_rule), group_of=recipe.group_of)
    ours = {id(p): group for group in groups for p in group["params"]}
    first_step = recipe.first_step_scales(recipe.lr_scales)
    rows = reference["parameters"]
    own = dict(model.named_parameters())
    compared, absent, differing = 0, [], []
    for row in rows:
        name = names[row["name"]]
        if name is None:
            absent.append(row["name"])
            continue
        group = ours[id(own[name])]
        declared = 1.0 if row["lr_scale"] is None else row["lr_scale"]
        # timm >= 0.6.5 applies the group's lr_scale inside the scheduler, and EVP's loop again.
        expected = {"weight_decay": row["weight_decay"], "lr_scale": declared ** 2,
                    "first_step_lr_scale": declared}
        got = {"weight_decay": group["weight_decay"], "lr_scale": group["lr_scale"],
               "first_step_lr_scale": first_step.get(group["role"], group["lr_scale"])}
        compared += 1
        if any(abs(got[key] - expected[key]) > 1e-15 for key in expected):
            differing.append({"evp": row["name"], "ours": name, "expected": expected, "got": got})
    unmatched = sorted(set(own) - {name for name in names.values() if name})
    return {"compared": compared, "differing": differing, "absent_here": absent,
            "ours_not_in_evp": unmatched, "ok": not differing and not unmatched}


def check_schedule(model, reference_dir):
    reference = torch.load(os.path.join(reference_dir, "lr_schedule.pt"))["lrs"]  # (iterations, 5 groups)
    with open(os.path.join(reference_dir, "lr_schedule.json")) as handle:
        meta = json.load(handle)
    iterations_per_epoch, epochs = meta["iters_per_epoch"], meta["epochs"]
    recipe, optimizer = our_optimizer(model, meta["base_lr"])
    scheduler = build_scheduler(optimizer, epochs * iterations_per_epoch,
                                warmup_iterations=round(recipe.warmup_epochs * iterations_per_epoch),
                                schedule=recipe.schedule,
                                first_step_lr_scales=recipe.first_step_scales(recipe.lr_scales))
    # EVP's groups (lesslr_no_decay, lesslr_decay, no_lr, no_decay, decay) -> one of ours each.
    ours_for = {0: "unet_no_decay", 1: "unet_decay", 3: "head_no_decay", 4: "head_decay"}
    also_lesslr = ("text_encoder_decay", "vae_decay")
    index = {group["name"]: i for i, group in enumerate(optimizer.param_groups)}
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step()
        for _ in range(reference.shape[0]):
            lrs.append([group["lr"] for group in optimizer.param_groups])
            scheduler.step()
    lrs = torch.tensor(lrs, dtype=torch.float64)
    worst = 0.0
    for evp_group, name in ours_for.items():
        names = [name] + (list(also_lesslr) if evp_group == 1 else [])
        for ours in names:
            relative = ((lrs[:, index[ours]] - reference[:, evp_group]).abs() / reference[:, evp_group]).max()
            worst = max(worst, float(relative))
    points = {label: {"iteration": point["iteration"], "evp": point["lr_per_group"],
                      "ours": [float(lrs[point["iteration"], index[ours_for[g]]]) if g in ours_for else 0.0
                               for g in range(5)]}
              for label, point in meta["points"].items()}
    return {"iterations": reference.shape[0], "max_relative_difference": worst, "points": points,
            "our_groups": [group["name"] for group in optimizer.param_groups], "ok": worst <= LR_TOLERANCE}


# ------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True,
                        help="folder of tools/evp_reference/run_evp.py's outputs (evp_random.pth, ...)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--grad_checkpoint", action=argparse.BooleanOptionalAction, default=True,
                        help="gradient checkpointing in the training step (same numbers, ~5 GiB less)")
    parser.add_argument("--skip_train", action="store_true", help="leave out the training step")
    parser.add_argument("--sensitivity", type=float, default=5e-6,
                        help="also rerun our training step with the UNet features moved by up to this "
                             "fraction of their largest value (0: not), to show how far fp32 rounding "
                             "alone carries the gradients (default: 5e-6, the eval-mode difference to EVP's)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    results = {"command": command_line(__file__),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{device_name(torch.device('cpu'))}, torch threads {args.threads}, load "
                          f"average {os.getloadavg()[0]:.1f} at the start",
               "versions": library_versions()}
    log(f"{results['command']} | {results['machine']} | {results['versions']}")
    model, results["load"] = check_load(os.path.join(args.reference, "evp_random.pth"))
    inputs = torch.load(os.path.join(args.reference, "inputs.pt"))
    log(f"load: {results['load']['missing']} missing, {results['load']['unexpected']} unexpected, ignored "
        f"{results['load']['ignored']} (peak RSS {peak_rss_gib():.1f} GiB)")
    with open(os.path.join(args.reference, "optimizer_groups.json")) as handle:
        evp_groups = json.load(handle)
    names = our_names([row["name"] for row in evp_groups["parameters"]], model)
    results["groups"] = check_groups(model, evp_groups, names)
    log(f"optimizer groups: {results['groups']['compared']} tensors compared, "
        f"{len(results['groups']['differing'])} differ; absent here: {results['groups']['absent_here']}")
    results["schedule"] = check_schedule(model, args.reference)
    log(f"lr schedule: {results['schedule']['iterations']} iterations, max relative difference "
        f"{results['schedule']['max_relative_difference']:.2e}")
    for label, point in results["schedule"]["points"].items():
        log(f"  {label} (iteration {point['iteration']}): EVP {point['evp']} ours {point['ours']}")
    results["eval"] = check_eval(model, inputs, args.reference)
    log(f"eval logits: max|d| {results['eval']['logits']['max_abs']:.3e}, argmax agreement "
        f"{results['eval']['argmax_agreement_percent']:.4f} % (peak RSS {peak_rss_gib():.1f} GiB)")
    for name, diff in results["eval"]["intermediates"].items():
        log(f"  {name}: max|d| {diff['max_abs']:.3e} (relative {diff['relative']:.2e})")
    if not args.skip_train:
        results["train"] = check_train_step(model, inputs, args.reference, args.grad_checkpoint, names,
                                            args.sensitivity)
        train = results["train"]
        log(f"training step: loss ours {train['loss']['ours']:.9f} EVP {train['loss']['theirs']:.9f} "
            f"(|d| {train['loss']['abs_diff']:.2e}); train-mode logits max|d| "
            f"{train['train_logits']['max_abs']:.2e} (relative {train['train_logits']['relative']:.2e}; "
            f"peak RSS {peak_rss_gib():.1f} GiB)")
        sensitivity = train.get("sensitivity")
        if sensitivity:
            log(f"  ours against ours with the UNet features moved by {sensitivity['perturbation']:g} of their "
                f"largest value: loss |d| {sensitivity['loss_abs_diff']:.2e}, train-mode logits max|d| "
                f"{sensitivity['train_logits']['max_abs']:.2e}")
        for name, diff in train["gradients"].items():
            moved = (f"; ours perturbed: max|d| {sensitivity['gradients'][name]['max_abs']:.2e} (relative "
                     f"{sensitivity['gradients'][name]['relative']:.2e})" if sensitivity else "")
            log(f"  grad {name}: max|d| {diff['max_abs']:.2e} (relative {diff['relative']:.2e}, cosine "
                f"{diff['cosine']:.7f}){moved}")
        log(f"  gradients within {LOGIT_TOLERANCE:g}: {train['gradients_within_tolerance']} of "
            f"{len(train['gradients'])}; within {LOGIT_TOLERANCE:g} or no further from EVP's than our "
            f"perturbed run from ours: {train['gradients_within_tolerance_or_sensitivity']}")
    checks = [key for key in ("load", "groups", "schedule", "eval", "train") if key in results]
    results["seconds"] = round(time.time() - started, 1)
    results["peak_rss_gib"] = round(peak_rss_gib(), 2)
    results["ok"] = all(results[key]["ok"] for key in checks)
    log(" ".join(f"{key} {'ok' if results[key]['ok'] else 'FAILED'}" for key in checks)
        + f"; {results['seconds']} s, peak RSS {results['peak_rss_gib']} GiB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    run_cli(main)
