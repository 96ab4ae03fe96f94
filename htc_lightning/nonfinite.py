"""Finite weights only: the errors of the NaN/inf guard and its device-side checks.

A training step is checked once, after backward and before the optimiser step, with one flag that covers
the loss terms and every gradient (``DetectionModule.check_finite``); a checkpoint is checked before it is
written (``DetectionModule.on_save_checkpoint``). The checks below run on the device and return a tensor, so
the host waits for the device once per step (to read the flag), not once per parameter.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

# How to go on from the last good checkpoint (a resumed run takes a new lr or clipping from its config)
RECOVERY = ("lower the lr or enable gradient clipping (trainer.gradient_clip_val) and resume from the last "
            "checkpoint (--ckpt_path last)")


class NonFiniteLossError(FloatingPointError):
    """A loss term or a gradient became NaN or inf (``nan_policy="raise"``, or too many consecutive skips);
    the message names the step and the culprits."""


class NonFiniteWeightsError(FloatingPointError):
    """A checkpoint was about to be written with NaN or inf weights; nothing was written."""


def all_finite(tensors: Iterable[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the tensors' device: every element of every tensor is finite. Fused (one
    ``_foreach_norm`` per device and dtype); the max-norm propagates NaN and inf and cannot overflow."""
    tensors = [t.detach() for t in tensors if t.is_floating_point()]
    if not tensors:
        return torch.tensor(True)
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors, float("inf")))


def non_finite_names(named: Iterable[tuple[str, Tensor | None]], limit: int = 5) -> tuple[list[str], int]:
    """The names of the first ``limit`` tensors holding a NaN or inf, and how many such tensors there are.
    One host-device sync per tensor: only for the error message, after ``all_finite`` said something is wrong."""
    bad = [name for name, t in named if t is not None and t.is_floating_point() and not torch.isfinite(t).all()]
    return bad[:limit], len(bad)


def describe(names: list[str], count: int) -> str:
    more = f" and {count - len(names)} more" if count > len(names) else ""
    return ", ".join(names) + more


def step_flags(step_losses: list[dict[str, Tensor]], grads: list[Tensor], device: torch.device) -> Tensor:
    """``[losses bad, gradients bad]`` as a float tensor on ``device`` (summable across ranks), with no sync."""
    ok = [all_finite(terms.values()).to(device) for terms in step_losses] + [all_finite(grads).to(device)]
    return torch.stack([~torch.stack(ok[:-1]).all() if step_losses else ~ok[-1].new_ones(()), ~ok[-1]]).float()


def step_culprits(step_losses: list[dict[str, Tensor]], named_parameters: Iterable[tuple[str, nn.Parameter]],
                  loss_bad: bool) -> tuple[str, str]:
    """What was non-finite (``"loss"`` or ``"gradients ..."``) and the terms or parameters, for the messages."""
    if loss_bad:
        terms = {k: float(v.float().sum()) for t in step_losses for k, v in t.items() if not torch.isfinite(v).all()}
        return "loss", ", ".join(f"{k}={v}" for k, v in terms.items()) or "on another rank"
    names, count = non_finite_names((n, p.grad) for n, p in named_parameters)
    return "gradients (the loss is finite)", f"{count} parameter(s), {describe(names, count)}" if count \
        else "on another rank"


def check_buffers(module: Any, where: str) -> None:
    """A skipped step must leave the model as it was, but the forward pass of a NaN batch may already have
    written NaN into buffers (BatchNorm running statistics in train mode), which no optimiser skip undoes.
    ``module``: the LightningModule; every rank calls this at the same step (the step's flag was agreed)."""
    ok = all_finite(b for _, b in module.named_buffers()).to(module.device).float()
    if module.trainer.world_size > 1:
        ok = module.trainer.strategy.reduce(ok, reduce_op="min")
    if bool(ok):
        return
    names, count = non_finite_names(module.named_buffers())
    raise NonFiniteLossError(
        f"cannot skip {where}: its forward pass already wrote non-finite values into "
        f"{describe(names, count) or 'buffers on another rank'}. To go on, {RECOVERY}.")


def check_weights(state_dict: dict[str, Tensor], step: int, folder: str | None) -> None:
    """Refuse to save non-finite weights (one host-device sync per save), before anything is written."""
    if bool(all_finite(state_dict.values())):
        return
    names, count = non_finite_names(state_dict.items())
    kept = f"the checkpoints in {folder} stay as they were" if folder else "existing checkpoints stay as they were"
    raise NonFiniteWeightsError(
        f"refusing to save a checkpoint at step {step}: {count} tensor(s) of the model hold NaN or inf "
        f"({describe(names, count)}). Nothing was written; {kept}. To go on, {RECOVERY}.")
