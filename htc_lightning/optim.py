"""Parameter groups by name pattern, mmdetection's ``paramwise_cfg`` as typed YAML.

mmdet writes ``paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1)}, norm_decay_mult=0.)``; here::

    model:
      init_args:
        param_groups:
          - {pattern: '^backbone\\.', lr_mult: 0.1}     # a regular expression searched in the parameter's name
        norm_decay_mult: 0.0                             # no weight decay on normalisation layers
        bias_decay_mult: 0.0                             # nor on the other layers' biases

The first rule whose pattern matches a parameter's name (``detector.named_parameters()``, e.g.
``backbone.body.layer1.0.conv1.weight``) gives its ``lr_mult`` and ``decay_mult``; parameters matching no rule
keep 1. ``norm_decay_mult`` multiplies the decay of every parameter of a normalisation layer (BatchNorm,
GroupNorm, LayerNorm and their subclasses), ``bias_decay_mult`` that of the other layers' biases, on top of the
rule's ``decay_mult`` (mmdet's order of application).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass
class ParamGroupRule:
    """Learning-rate and weight-decay multipliers for the parameters whose name matches ``pattern`` (a regular
    expression, searched: ``'backbone'`` matches ``backbone.stem.weight``, ``'^roi_head\\.bbox_head'`` only those)."""

    pattern: str
    lr_mult: float = 1.0
    decay_mult: float = 1.0


def param_groups(model: nn.Module, rules: Sequence[ParamGroupRule] = (), norm_decay_mult: float | None = None,
                 bias_decay_mult: float | None = None) -> list[dict]:
    """The trainable parameters of ``model`` in groups of equal multipliers, each group a dict with ``params``,
    ``lr_mult``, ``decay_mult`` and a ``name`` (what the lr monitor logs), in the order of first appearance.

    A rule that matches no trainable parameter is an error (a typo would otherwise silently train at full lr).
    """
    compiled = []
    for rule in rules:
        try:
            compiled.append((re.compile(rule.pattern), rule))
        except re.error as e:
            raise ValueError(f"param_groups: pattern {rule.pattern!r} is not a regular expression: {e}") from e
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    groups: dict[tuple, dict] = {}
    used = [False] * len(compiled)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult, decay_mult, label = 1.0, 1.0, "default"
        for i, (regex, rule) in enumerate(compiled):
            if regex.search(name):
                lr_mult, decay_mult, label, used[i] = rule.lr_mult, rule.decay_mult, rule.pattern, True
                break
        if id(param) in norm_params:
            if norm_decay_mult is not None:
                decay_mult, label = decay_mult * norm_decay_mult, f"{label}/norm"
        elif name.endswith("bias") and bias_decay_mult is not None:
            decay_mult, label = decay_mult * bias_decay_mult, f"{label}/bias"
        key = (label, lr_mult, decay_mult)
        group = groups.setdefault(key, {"params": [], "lr_mult": lr_mult, "decay_mult": decay_mult, "name": label})
        group["params"].append(param)
    unused = [rule.pattern for (_, rule), hit in zip(compiled, used) if not hit]
    if unused:
        example = next((n for n, p in model.named_parameters() if p.requires_grad), "")
        raise ValueError(f"param_groups: pattern(s) {unused} match no trainable parameter name (names look like "
                         f"{example!r}; the patterns are regular expressions searched in them)")
    return list(groups.values())
