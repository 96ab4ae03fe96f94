"""mmdet's ``frozen_stages`` and ``norm_eval`` for any backbone."""
from collections.abc import Iterable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def apply_freezing(root: nn.Module, frozen: Iterable[nn.Module], norm_eval: bool, training: bool) -> None:
    """Frozen modules stay in eval mode without gradients; with ``norm_eval`` every BatchNorm of ``root`` keeps
    its running statistics while training (detection batches are too small to estimate them)."""
    for module in frozen:
        module.eval()
        for param in module.parameters():
            param.requires_grad_(False)
    if training and norm_eval:
        for module in root.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
