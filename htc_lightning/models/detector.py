"""The two-stage detector: backbone -> FPN -> proposal generator -> RoI head.

A plain ``nn.Module`` usable without Lightning. Every part is a constructor argument, so YAML picks
them by ``class_path`` (plain RPN or GA-RPN; HTC, Cascade or Mask R-CNN RoI head; a timm backbone or
FishNet). Attribute names are mmdet's (``backbone``, ``neck``, ``rpn_head``, ``roi_head``) so that
model-zoo checkpoints map onto them key for key.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from ..structures import Detections, ImageMeta, to_original_frame
from .proposals.base import ProposalGenerator


class Detector(nn.Module):
    """Args:
        backbone: returns a list of feature maps and exposes ``out_channels``/``strides``.
        neck: the FPN.
        rpn_head: a :class:`ProposalGenerator` (``RPN`` or ``GARPN``).
        roi_head: the second stage; ``None`` makes a proposal-only model (e.g. GA-RPN alone), whose
            ``predict`` returns the proposals as class-0 detections.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, rpn_head: ProposalGenerator,
                 roi_head: nn.Module | None = None) -> None:
        super().__init__()
        if hasattr(neck, "bind"):
            neck.bind(backbone.out_channels, backbone.strides)
        self.backbone = backbone
        self.neck = neck
        self.rpn_head = rpn_head
        self.roi_head = roi_head

    @property
    def num_classes(self) -> int:
        return int(getattr(self.roi_head, "num_classes", 1))

    @property
    def with_mask(self) -> bool:
        return bool(getattr(self.roi_head, "with_mask", False))

    @property
    def with_semantic(self) -> bool:
        return getattr(self.roi_head, "semantic_head", None) is not None

    def extract_feats(self, images: Tensor) -> list[Tensor]:
        # named scopes give benchmarks/profile_htc.py its per-part table; they cost nothing unprofiled
        with record_function("backbone"):
            feats = self.backbone(images)
        with record_function("neck"):
            return self.neck(feats)

    def forward(self, images: Tensor) -> list[Tensor]:
        """The FPN features (what a ``torch.compile`` or a feature probe wants)."""
        return self.extract_feats(images)

    def loss(self, images: Tensor, targets: list[dict], metrics: dict[str, Tensor] | None = None
             ) -> dict[str, Tensor]:
        """Training losses, all of them to be summed; ``metrics``, when given, receives the detached values that
        are watched but not optimised (the RoI head's box accuracies ``s{t}.acc``)."""
        feats = self.extract_feats(images)
        img_sizes = [tuple(t["meta"]["img_size"]) for t in targets]
        with record_function("rpn_head"):
            raw = self.rpn_head(feats)
            losses = dict(self.rpn_head.loss(raw, targets, img_sizes))
        if self.roi_head is not None:
            # the RPN's proposals are targets-independent inputs of the second stage: no gradient
            # flows back through them (mmdet detaches the scores and deltas it decodes)
            with torch.no_grad(), record_function("rpn_proposals"):
                proposals = self.rpn_head.proposals(raw, img_sizes)
            with record_function("roi_head"):
                losses.update(self.roi_head.loss(feats, proposals, targets, metrics=metrics))
        return losses

    @torch.no_grad()
    def predict(self, images: Tensor, metas: list[ImageMeta]) -> list[Detections]:
        feats = self.extract_feats(images)
        img_sizes = [tuple(m["img_size"]) for m in metas]
        with record_function("rpn_head"):
            raw = self.rpn_head(feats)
        with record_function("rpn_proposals"):
            proposals = self.rpn_head.proposals(raw, img_sizes)
        if self.roi_head is None:
            return [proposals_to_detections(p, m) for p, m in zip(proposals, metas)]
        with record_function("roi_head"):
            return self.roi_head.predict(feats, proposals, metas)

    def convert_checkpoint_keys(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Let a backbone whose module tree differs from mmdet's rename its ``backbone.*`` keys."""
        convert = getattr(self.backbone, "convert_mmdet_keys", None)
        if convert is None:
            return state_dict
        inner = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        rest = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
        return {**{f"backbone.{k}": v for k, v in convert(inner).items()}, **rest}


def proposals_to_detections(proposals: Tensor, meta: ImageMeta) -> Detections:
    """Proposals (N, 5) in the resized frame -> class-0 detections in the original frame."""
    return Detections(to_original_frame(proposals[:, :4], meta), proposals[:, 4],
                      torch.zeros(len(proposals), dtype=torch.long, device=proposals.device))
