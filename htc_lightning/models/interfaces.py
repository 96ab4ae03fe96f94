"""The contracts between the Detector's parts, and the one spec through which a part learns what only its
parent knows (the widths and strides of its input, the class count).

A part that depends on its parent is given as a factory, ``Callable[[FeatureSpec], nn.Module]``: YAML names a
``class_path`` and the part's own ``init_args``; the parent calls it with the spec as the first argument. The
Detector builds the neck from the backbone's spec, and the proposal generator and RoI head from the neck's; the
RoI head builds its per-stage heads and semantic branch from the same spec. The widths and the class count are
never repeated in a config.

The factories' return type is ``nn.Module`` because jsonargparse matches a Protocol by methods only; what a
part must offer is the Protocol below, checked by the parent when it builds the part (:func:`check_part`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from ..structures import Detections, ImageMeta


@dataclass(frozen=True)
class FeatureSpec:
    """What a part is built for: ``channels`` and ``strides`` of its input feature maps (finest first) and the
    number of object classes (background not counted)."""

    channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_classes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if len(self.channels) != len(self.strides):
            raise ValueError(f"FeatureSpec: {len(self.channels)} channel counts for {len(self.strides)} strides")

    @classmethod
    def pyramid(cls, width: int, num_classes: int = 80, strides: Sequence[int] = (4, 8, 16, 32, 64)) -> FeatureSpec:
        """An FPN's spec: every level ``width`` wide (what a head built outside a Detector is given)."""
        return cls((width,) * len(strides), tuple(strides), num_classes)

    @property
    def width(self) -> int:
        """The channel count shared by every level (a pyramid's); an error for a backbone's mixed widths."""
        if len(set(self.channels)) != 1:
            raise ValueError(f"this part needs inputs of one width, got channels {self.channels}")
        return self.channels[0]


@dataclass(frozen=True)
class ProposalSettings:
    """How many proposals a generator keeps, given explicitly for training or test (never read from
    ``module.training``): ``nms_pre`` top-scored candidates per level, ``nms_post`` kept per level after its
    NMS (GA-RPN; the plain RPN suppresses all levels together), ``max_per_img`` in the end, and whether the
    location filter applies (GA-RPN at test time, as mmdet's ``use_loc_filter = not training``)."""

    nms_pre: int
    max_per_img: int
    nms_post: int | None = None
    location_filter: bool = False


@runtime_checkable
class Backbone(Protocol):
    out_channels: Sequence[int]
    strides: Sequence[int]

    def __call__(self, images: Tensor) -> list[Tensor]: ...


@runtime_checkable
class Neck(Protocol):
    """Feature maps of a backbone -> a pyramid of ``len(strides)`` maps, each ``out_channels`` wide."""

    out_channels: int
    strides: Sequence[int]

    def __call__(self, feats: Sequence[Tensor]) -> list[Tensor]: ...


@runtime_checkable
class ProposalGenerator(Protocol):
    """The first stage. ``__call__(feats)`` returns raw outputs that ``loss`` and ``proposals`` consume;
    ``proposals`` takes :class:`ProposalSettings` (its own ``train_settings`` or ``test_settings``) and returns
    per image (N, 5) boxes + objectness in the resized frame. ``merge_proposals`` merges several test views'
    proposals of one image (test-time augmentation)."""

    train_settings: ProposalSettings
    test_settings: ProposalSettings

    def __call__(self, feats: list[Tensor]) -> Any: ...

    def loss(self, raw: Any, targets: list[dict], img_sizes: list[tuple[int, int]]) -> dict[str, Tensor]: ...

    def proposals(self, raw: Any, img_sizes: list[tuple[int, int]], settings: ProposalSettings) -> list[Tensor]: ...

    def merge_proposals(self, proposals: Sequence[Tensor]) -> Tensor: ...


@runtime_checkable
class RoIHead(Protocol):
    """The second stage. Its abilities are attributes: ``with_mask`` (``predict`` fills ``Detections.masks``),
    ``with_semantic`` (``loss`` reads ``target["semantic"]``), ``class_sized_parameters`` (names, relative to
    the head, of the tensors whose first dimension counts classes: what fine-tuning on other classes
    re-initialises)."""

    num_classes: int
    with_mask: bool
    with_semantic: bool
    class_sized_parameters: tuple[str, ...]

    def loss(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], targets: Sequence[dict],
             metrics: dict[str, Tensor] | None = None) -> dict[str, Tensor]: ...

    def predict(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], metas: Sequence[ImageMeta],
                rescale: bool = True) -> list[Detections]: ...


@runtime_checkable
class AugmentableRoIHead(RoIHead, Protocol):
    """A RoI head that test-time augmentation (``tta.py``) can drive: per view it takes the semantic feature,
    the cascade's scores and boxes, and the mask probabilities; it merges them and post-processes once."""

    def semantic(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor] | None: ...

    def refine_and_score(self, feats: Sequence[Tensor], rois: Tensor, img_sizes: Any,
                         semantic_feat: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    def postprocess_boxes(self, scores: Tensor, boxes: Tensor, meta: ImageMeta, rescale: bool = True
                          ) -> Detections: ...

    def mask_probs(self, feats: Sequence[Tensor], rois: Tensor, semantic_feat: Tensor | None = None,
                   labels: Tensor | None = None) -> Tensor: ...

    def postprocess_masks(self, dets: Detections, probs: Tensor | None, meta: ImageMeta, rescale: bool = True
                          ) -> Detections: ...


NeckFactory = Callable[[FeatureSpec], nn.Module]
"""``(backbone's spec) -> Neck``, e.g. ``FPN`` with its ``init_args``."""
ProposalGeneratorFactory = Callable[[FeatureSpec], nn.Module]
"""``(neck's spec) -> ProposalGenerator``, e.g. ``RPN`` or ``GARPN``."""
RoIHeadFactory = Callable[[FeatureSpec], nn.Module]
"""``(neck's spec) -> RoIHead``, e.g. ``CascadeRoIHead``."""


def check_part(part: Any, protocol: type, role: str) -> Any:
    """``part`` if it offers every member of ``protocol``, else a TypeError naming the missing ones."""
    if not isinstance(part, protocol):
        members = [n for n in _members(protocol) if not hasattr(part, n)]
        raise TypeError(f"{role} {type(part).__qualname__} does not implement {protocol.__name__}: it lacks "
                        f"{', '.join(members)} (see htc_lightning/models/interfaces.py)")
    return part


def _members(protocol: type) -> list[str]:
    names: list[str] = []
    for klass in reversed(protocol.__mro__):
        if klass in (object, Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        names += [n for n in (*getattr(klass, "__annotations__", {}), *vars(klass))
                  if not n.startswith("_") and n not in names]
    return names
