"""``fit --ckpt_path``: the configured model wins over the checkpoint's hyper-parameters, so say what differs.

A change that loads (a threshold, a sampler, a loss weight) is reported once and the config's value is used; a
change the checkpoint's weights cannot fill (another head, another class count) is an error that names the keys
and the settings behind them, before Lightning's strict ``load_state_dict`` fails with a bare key list.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor

# Lightning restores them with the optimiser and scheduler state; apply_configured_optimiser puts the config's back.
OPTIMIZER_HPARAMS = ("lr", "base_batch_size", "momentum", "weight_decay")
MAX_LISTED = 8


class CheckpointMismatchError(ValueError):
    """The checkpoint's weights do not fit the configured model; the message names the keys and settings."""


def config_changes(saved: Any, configured: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, checkpoint's value, config's value)`` for every leaf that differs; private keys (``_...``)
    are skipped. A changed ``class_path`` is one change (its ``init_args`` are another class's)."""
    if isinstance(saved, Mapping) and isinstance(configured, Mapping):
        if saved.get("class_path") != configured.get("class_path") and "class_path" in saved:
            return [(f"{prefix}class_path", saved.get("class_path"), configured.get("class_path"))]
        changes = []
        for key in sorted(set(saved) | set(configured), key=str):
            if str(key).startswith("_"):
                continue
            changes += config_changes(saved.get(key), configured.get(key), f"{prefix}{key}.")
        return changes
    if _normalised(saved) == _normalised(configured):
        return []
    return [(prefix.rstrip("."), saved, configured)]


def _normalised(value: Any) -> Any:
    # YAML gives lists where Python code gives tuples; the checkpoint may hold either
    return [_normalised(v) for v in value] if isinstance(value, (list, tuple)) else value


def state_dict_mismatch(saved: Mapping[str, Tensor], model: Mapping[str, Tensor]) -> list[str]:
    """What stops a strict load: keys only in the model, only in the checkpoint, and shape differences."""
    missing = [k for k in model if k not in saved]
    unexpected = [k for k in saved if k not in model]
    shapes = [f"{k} (checkpoint {list(saved[k].shape)}, model {list(model[k].shape)})" for k in model
              if k in saved and hasattr(saved[k], "shape") and saved[k].shape != model[k].shape]
    problems = []
    for what, keys in (("missing in the checkpoint", missing), ("not in the model", unexpected),
                       ("of another shape", shapes)):
        if keys:
            more = f" and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
            problems.append(f"{len(keys)} weight(s) {what}: {', '.join(keys[:MAX_LISTED])}{more}")
    return problems


def _format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    lines = [f"  {key}: {old!r} (checkpoint) -> {new!r} (config)" for key, old, new in changes[:2 * MAX_LISTED]]
    if len(changes) > 2 * MAX_LISTED:
        lines.append(f"  ... and {len(changes) - 2 * MAX_LISTED} more")
    return "\n".join(lines)


def check_resume(checkpoint: Mapping[str, Any], hparams: Mapping[str, Any], model_state: Mapping[str, Tensor],
                 ckpt_path: str | None, fitting: bool, strict: bool = True) -> bool:
    """Raise :class:`CheckpointMismatchError` when ``checkpoint``'s weights cannot load into the model; when
    ``fitting``, report (once, rank 0) the settings in which the configured ``hparams`` differ from the
    checkpoint's, whose values the run uses. True when optimiser settings changed (see
    :func:`apply_configured_optimiser`)."""
    source = f"--ckpt_path {ckpt_path}" if ckpt_path else "the checkpoint"
    if fitting and hparams.get("lr_scheduler") is None and any(
            "lr_lambdas" in state for state in checkpoint.get("lr_schedulers") or ()):
        # Lightning would load the one LambdaLR state into the warm-up and leave the decay at epoch 0, silently
        raise CheckpointMismatchError(
            f"{source}: the checkpoint holds the lr schedule of an older htc-lightning (one LambdaLR stepped per "
            "step), which cannot continue as today's per-step LinearLR warm-up and per-epoch MultiStepLR decay. "
            f"Start a new run from its weights with --model.init_args.load_from {ckpt_path or 'FILE'} (the schedule "
            "restarts at step 0), or resume it with the htc-lightning version that wrote it.")
    changes = config_changes(dict(checkpoint.get("hyper_parameters") or {}), dict(hparams))
    problems = state_dict_mismatch(checkpoint.get("state_dict") or {}, model_state) if strict else []
    if problems:
        settings = f" The configured model differs from the checkpoint's in:\n{_format_changes(changes)}\n" \
            if changes else " "
        raise CheckpointMismatchError(
            f"{source}: the checkpoint's weights do not fit the configured model: " + "; ".join(problems) + "."
            + settings + "Resume with the model config the checkpoint was trained with (its run folder's "
            "config.yaml), or start a new run from its weights with model.init_args.load_from "
            "(the weights that fit are loaded, the others reported).")
    if not (fitting and changes):
        return False
    optimiser = [key for key, _, _ in changes if key in OPTIMIZER_HPARAMS]
    note = (f"\n{', '.join(optimiser)}: applied to the optimiser and lr schedule restored from the checkpoint (their "
            "state, momentum and position in the schedule, is kept)." if optimiser else "")
    rank_zero_warn(f"{source}: the configured model differs from the checkpoint's; the run uses the config's "
                   f"values:\n{_format_changes(changes)}{note}")
    return bool(optimiser)


def apply_configured_optimiser(module: Any) -> None:
    """After Lightning restored a resumed run's optimiser and lr scheduler: give them the hyper-parameters of the
    configured ones (``module.configure_optimizers()``: lr, momentum, weight decay ...), keeping their state. Each
    group's current lr moves by the factor its base lr moved, so warm-up and decay go on from the same step."""
    configured = module.configure_optimizers()
    if isinstance(configured, Mapping):
        configured = configured["optimizer"]
    while isinstance(configured, (list, tuple)):
        configured = configured[0]
    restored = module.trainer.optimizers[0]
    schedulers = [c.scheduler for c in module.trainer.lr_scheduler_configs if c.scheduler.optimizer is restored]
    for i, (group, new) in enumerate(zip(restored.param_groups, configured.param_groups)):
        base_new = new.get("initial_lr", new["lr"])
        base_old = group.get("initial_lr", group["lr"])
        group.update({k: v for k, v in new.items() if k not in ("params", "lr", "initial_lr")})
        group["lr"] = group["lr"] * base_new / base_old if base_old else base_new
        if "initial_lr" in group:
            group["initial_lr"] = base_new
        for scheduler in schedulers:
            scheduler.base_lrs[i] = base_new
