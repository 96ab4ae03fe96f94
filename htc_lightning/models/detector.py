"""The two-stage detector: backbone -> FPN -> proposal generator -> RoI head.

A plain ``nn.Module`` usable without Lightning, and the one place that wires the parts: it builds the neck
from the backbone's :class:`FeatureSpec`, then the proposal generator and the RoI head from the neck's, with
the class count (see ``interfaces.py``). YAML picks every part by ``class_path`` (plain RPN or GA-RPN; HTC,
Cascade or Mask R-CNN RoI head; a timm backbone or FishNet) and gives only its own settings. Attribute names
are mmdet's (``backbone``, ``neck``, ``rpn_head``, ``roi_head``) so that model-zoo checkpoints map onto them
key for key.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from ..structures import Detections, ImageMeta, to_original_frame
from .interfaces import (
    Backbone,
    FeatureSpec,
    Neck,
    NeckFactory,
    ProposalGenerator,
    ProposalGeneratorFactory,
    RoIHead,
    RoIHeadFactory,
    check_part,
)


class Detector(nn.Module):
    """Args:
        backbone: a :class:`Backbone` (feature maps, ``out_channels``, ``strides``).
        neck: builds the :class:`Neck` for the backbone's spec (``FPN``).
        rpn_head: builds the :class:`ProposalGenerator` for the neck's spec (``RPN`` or ``GARPN``).
        roi_head: builds the :class:`RoIHead` for the neck's spec and ``num_classes``; ``None`` makes a
            proposal-only model (e.g. GA-RPN alone), whose ``predict`` returns the proposals as class-0 detections.
        num_classes: object classes, background not counted; the CLI links it from the data module.
    """

    def __init__(self, backbone: nn.Module, neck: NeckFactory, rpn_head: ProposalGeneratorFactory,
                 roi_head: RoIHeadFactory | None = None, num_classes: int = 80) -> None:
        # neck and rpn_head have no default class: jsonargparse would carry a default's init_args over to
        # another class_path that shares their names (RPN's allowed_border into GARPN's)
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"Detector: num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.backbone = check_part(backbone, Backbone, "backbone")
        self.neck = check_part(neck(FeatureSpec(backbone.out_channels, backbone.strides, num_classes)), Neck, "neck")
        spec = FeatureSpec((self.neck.out_channels,) * len(self.neck.strides), self.neck.strides, num_classes)
        self.rpn_head = check_part(rpn_head(spec), ProposalGenerator, "rpn_head")
        self.roi_head = None if roi_head is None else check_part(roi_head(spec), RoIHead, "roi_head")

    @property
    def with_mask(self) -> bool:
        return self.roi_head is not None and self.roi_head.with_mask

    @property
    def with_semantic(self) -> bool:
        return self.roi_head is not None and self.roi_head.with_semantic

    @property
    def class_sized_parameters(self) -> tuple[str, ...]:
        """State-dict names of the tensors whose first dimension counts classes."""
        return () if self.roi_head is None else tuple(f"roi_head.{n}" for n in self.roi_head.class_sized_parameters)

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
        """Training losses, all of them to be summed, with the generator's training settings whether the module
        is in train or eval mode; ``metrics``, when given, receives the detached values that are watched but not
        optimised (the RoI head's box accuracies ``s{t}.acc``)."""
        feats = self.extract_feats(images)
        img_sizes = [tuple(t["meta"]["img_size"]) for t in targets]
        with record_function("rpn_head"):
            raw = self.rpn_head(feats)
            losses = dict(self.rpn_head.loss(raw, targets, img_sizes))
        if self.roi_head is not None:
            # the RPN's proposals are targets-independent inputs of the second stage: no gradient
            # flows back through them (mmdet detaches the scores and deltas it decodes)
            with torch.no_grad(), record_function("rpn_proposals"):
                proposals = self.rpn_head.proposals(raw, img_sizes, self.rpn_head.train_settings)
            with record_function("roi_head"):
                losses.update(self.roi_head.loss(feats, proposals, targets, metrics=metrics))
        return losses

    @torch.no_grad()
    def predict(self, images: Tensor, metas: list[ImageMeta]) -> list[Detections]:
        """Detections in the original frame, with the generator's test settings."""
        feats = self.extract_feats(images)
        img_sizes = [tuple(m["img_size"]) for m in metas]
        with record_function("rpn_head"):
            raw = self.rpn_head(feats)
        with record_function("rpn_proposals"):
            proposals = self.rpn_head.proposals(raw, img_sizes, self.rpn_head.test_settings)
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
