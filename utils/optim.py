"""Optimizer and learning-rate schedules of the model recipes (VPD's poly decay, EVP's cosine), and
the loop of the tiny pre-training tools."""
import math
import time

import torch


def decays_matrices(name, parameter):
    """The common rule: weight decay on tensors of more than one dimension, none on biases and
    norm scales/shifts (and the adapter's gamma)."""
    return parameter.ndim > 1


def parameter_groups(model, weight_decay, lr_scales=None, decays=decays_matrices, group_of=None):
    """AdamW groups by role and decay, in the order the roles first appear.

    `group_of(name)` gives each trainable tensor's role (default: one role, "all"; train.py: the
    model preset's optimizer groups, e.g. UNet vs. the rest); `lr_scales` maps a role to its
    learning-rate multiplier (default 1). `decays(name, parameter)` says which tensors get weight
    decay. Each group carries `lr_scale`, which `build_optimizer` applies to the lr.
    """
    lr_scales = lr_scales or {}
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        role = group_of(name) if group_of is not None else "all"
        decay = bool(decays(name, parameter))
        key = (role, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": lr_scales.get(role, 1.0), "role": role,
                           "name": f"{role}_{'decay' if decay else 'no_decay'}"}
        groups[key]["params"].append(parameter)
    return list(groups.values())


def build_optimizer(model, lr, weight_decay, lr_scales=None, fused=None, amsgrad=False,
                    decays=decays_matrices, group_of=None):
    groups = parameter_groups(model, weight_decay, lr_scales, decays, group_of)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    if fused is None:  # the fused kernel is the fastest AdamW on GPUs and on CPUs
        fused = all(p.device.type in ("cuda", "cpu") for group in groups for p in group["params"])
    # Elsewhere the multi-tensor (foreach) path: PyTorch only picks it by default for CUDA tensors.
    # On a CPU the per-parameter loop cost ~15 % of the toy's step and foreach still ~8 %; the
    # fused kernel takes 6.6 ms there against foreach's 19.3 (bench/RESULTS.md).
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused,
                             foreach=None if fused else True, amsgrad=amsgrad)


def poly_lr_lambda(total_iterations, power=0.9, warmup_iterations=0, base_lr=None):
    """(1 - it / total) ^ power, stepped every iteration (VPD's schedule), times a linear warm-up
    over the first `warmup_iterations` steps when there are any (VPD has none). The factors do not
    depend on `base_lr`."""
    def factor(iteration):
        poly = max(0.0, 1.0 - iteration / max(total_iterations, 1)) ** power
        if warmup_iterations and iteration < warmup_iterations:
            return poly * (iteration + 1) / warmup_iterations
        return poly
    return factor


def cosine_lr_lambda(total_iterations, warmup_iterations=0, base_lr=1.0, warmup_lr=0.0, min_lr=0.0):
    """timm's CosineLRScheduler as EVP calls it (t_initial = the run, warmup_prefix=True, one
    cycle), per iteration: a linear warm-up from the lr `warmup_lr` to `base_lr` over the first
    `warmup_iterations` steps, then a half cosine from `base_lr` towards `min_lr` over
    `total_iterations` steps counted from the warm-up's end, so a run of `total_iterations` steps
    in all ends before the cosine does. `warmup_lr` and `min_lr` are learning rates, not factors."""
    def factor(iteration):
        if iteration < warmup_iterations:
            lr = warmup_lr + iteration * (base_lr - warmup_lr) / warmup_iterations
        else:
            progress = (iteration - warmup_iterations) / max(total_iterations, 1)
            lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
        return lr / base_lr
    return factor


def build_scheduler(optimizer, total_iterations, power=0.9, warmup_iterations=0, schedule=None,
                    first_step_lr_scales=None):
    """Each iteration's lr factor from `schedule(total_iterations, warmup_iterations, base_lr)` (a
    model preset's recipe; base_lr: the optimizer's lr), default the poly decay of `power`.
    `first_step_lr_scales` (group role -> multiplier) replaces the lr scale of those groups for
    the very first step only (EVP's code: Recipe.first_step_lr_scales)."""
    base_lr = optimizer.defaults["lr"]
    factor = (schedule(total_iterations, warmup_iterations=warmup_iterations, base_lr=base_lr)
              if schedule is not None else poly_lr_lambda(total_iterations, power, warmup_iterations))
    # LambdaLR multiplies each group's initial lr (already scaled by its lr_scale).
    factors = []
    for group in optimizer.param_groups:
        first = (first_step_lr_scales or {}).get(group.get("role"))
        if first is None or group["lr_scale"] == 0:
            factors.append(factor)
        else:
            factors.append(_first_step_scaled(factor, first / group["lr_scale"]))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _first_step_scaled(factor, first_step_ratio):
    return lambda iteration: factor(iteration) * (first_step_ratio if iteration == 0 else 1.0)


def fit_with_cosine_adamw(parameters, step_loss, steps, lr, weight_decay, log_every=100):
    """Minimise `step_loss(step)` (step = 1 .. steps; it draws its own batch) with foreach AdamW
    whose lr decays to 0 on a cosine, printing the loss every `log_every` steps and at the last:
    the loop of tools/pretrain_tiny_vae.py and tools/pretrain_tiny_unet.py."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, foreach=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)",
                  flush=True)
