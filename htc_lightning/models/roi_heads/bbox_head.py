"""The box head of one cascade stage: two shared fully connected layers, then classification and
class-agnostic box regression (mmdet's ``Shared2FCBBoxHead`` with ``reg_class_agnostic=True``), with the
training targets and losses of that stage (Cai & Vasconcelos, Cascade R-CNN; Chen et al., HTC)."""
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..interfaces import FeatureSpec
from ..layers.box_coder import BoxCoder
from ..layers.losses import cross_entropy, l1_loss, smooth_l1_loss
from ..layers.samplers import SamplingResult
from ..layers.tracing import known_empty


class Shared2FCBBoxHead(nn.Module):
    """Flattened RoI features -> ``shared_fcs.0/1`` (+ReLU) -> ``fc_cls`` (num_classes + 1, background is the
    LAST column, as mmdet 2.x/3.x) and ``fc_reg``: 4 deltas shared by every class (``reg_class_agnostic``, the
    cascade heads) or 4 per class (Mask R-CNN's head; the deltas of the gt / predicted class are used).

    Args:
        input: the pyramid's width and the class count (the RoI head passes its own spec).
        target_means, target_stds: the stage's delta normalisation (``DeltaXYWHBBoxCoder``); Cascade R-CNN
            tightens the stds per stage because the refined boxes are closer to their targets.
        bbox_loss: "smooth_l1" (beta ``smooth_l1_beta``; the cascade configs) or "l1" (mmdet's Faster/Mask R-CNN).
    """

    def __init__(self, input: FeatureSpec, roi_feat_size: int = 7,
                 fc_out_channels: int = 1024, target_means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                 target_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2), loss_cls_weight: float = 1.0,
                 loss_bbox_weight: float = 1.0, smooth_l1_beta: float = 1.0, reg_class_agnostic: bool = True,
                 bbox_loss: Literal["smooth_l1", "l1"] = "smooth_l1") -> None:
        super().__init__()
        if len(target_stds) != 4 or len(target_means) != 4:
            raise ValueError(f"Shared2FCBBoxHead: target_means {target_means} / target_stds {target_stds} "
                             "must have 4 values (dx, dy, dw, dh)")
        if bbox_loss not in ("smooth_l1", "l1"):
            raise ValueError(f"Shared2FCBBoxHead: bbox_loss {bbox_loss!r} is not 'smooth_l1' or 'l1'")
        num_classes, in_channels = input.num_classes, input.width
        self.num_classes = num_classes
        self.bbox_loss = bbox_loss
        self.shared_fcs = nn.ModuleList([nn.Linear(in_channels * roi_feat_size * roi_feat_size, fc_out_channels),
                                         nn.Linear(fc_out_channels, fc_out_channels)])
        self.fc_cls = nn.Linear(fc_out_channels, num_classes + 1)
        self.reg_class_agnostic = reg_class_agnostic
        self.fc_reg = nn.Linear(fc_out_channels, 4 if reg_class_agnostic else 4 * num_classes)
        # the tensors whose first dimension counts classes: what fine-tuning on other classes re-initialises
        self.class_sized_parameters = ("fc_cls.weight", "fc_cls.bias") + (
            () if reg_class_agnostic else ("fc_reg.weight", "fc_reg.bias"))
        self.coder = BoxCoder(target_means, target_stds)
        self.loss_cls_weight = loss_cls_weight
        self.loss_bbox_weight = loss_bbox_weight
        self.smooth_l1_beta = smooth_l1_beta
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # mmdet's ConvFCBBoxHead/BBoxHead init: Xavier-uniform shared fcs, N(0, 0.01) cls, N(0, 0.001) reg
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(K, C, S, S) RoI features -> (cls_score (K, num_classes + 1) logits, bbox_pred (K, 4 or 4 * classes))."""
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = torch.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)

    def targets(self, samples: Sequence[SamplingResult]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per sampled RoI, in the order of ``SamplingResult.boxes`` concatenated over images:
        labels (background = ``num_classes``), label weights, encoded box targets and box weights."""
        ref = samples[0].pos_boxes
        device = ref.device
        # every image's positives encoded at once (element-wise, so the same numbers as one by one), in float32
        # like the coder's targets whatever the boxes' dtype
        pos_t = self.coder.encode(torch.cat([s.pos_boxes for s in samples]),
                                  torch.cat([s.pos_gt_boxes for s in samples])).float()
        labels, box_t, start = [], [], 0
        for s in samples:
            num_pos, num_neg = len(s.pos_boxes), len(s.neg_boxes)
            labels += [s.pos_gt_labels.to(torch.long),
                       torch.full((num_neg,), self.num_classes, dtype=torch.long, device=device)]
            box_t += [pos_t[start:start + num_pos], pos_t.new_zeros(num_neg, 4)]
            start += num_pos
        labels = torch.cat(labels)
        box_w = (labels < self.num_classes).float()[:, None].expand(-1, 4).contiguous()
        return labels, torch.ones(len(labels), device=device), torch.cat(box_t), box_w

    def loss(self, cls_score: Tensor, bbox_pred: Tensor, labels: Tensor, label_weights: Tensor,
             bbox_targets: Tensor, bbox_weights: Tensor) -> dict[str, Tensor]:
        """mmdet ``BBoxHead.loss``: CE averaged over the RoIs with a positive label weight; SmoothL1 on the
        positives summed and divided by the number of ALL sampled RoIs. Losses only (see ``accuracy``)."""
        if cls_score.numel() == 0:
            zero = cls_score.sum() * 0 + bbox_pred.sum() * 0
            return {"loss_cls": zero, "loss_bbox": zero}
        # normalisers stay on the device: a float() here would make the host wait for the forward pass
        avg = (label_weights > 0).sum().clamp(min=1).float()
        loss_cls = cross_entropy(cls_score, labels, weight=label_weights, avg_factor=avg)
        # the box loss over every RoI with the box weights (zero off the positives): the positives' sum,
        # without gathering a data-dependent number of rows
        if self.reg_class_agnostic:
            pred = bbox_pred
        else:
            rows = torch.arange(len(bbox_pred), device=bbox_pred.device)
            pred = bbox_pred.view(len(bbox_pred), -1, 4)[rows, labels.clamp(max=self.num_classes - 1)]
        pos = ((labels >= 0) & (labels < self.num_classes)).to(bbox_weights.dtype)[:, None]
        avg = float(bbox_targets.shape[0])
        if self.bbox_loss == "l1":
            loss_bbox = l1_loss(pred, bbox_targets, weight=bbox_weights * pos, avg_factor=avg)
        else:
            loss_bbox = smooth_l1_loss(pred, bbox_targets, beta=self.smooth_l1_beta, weight=bbox_weights * pos,
                                       avg_factor=avg)
        return {"loss_cls": self.loss_cls_weight * loss_cls, "loss_bbox": self.loss_bbox_weight * loss_bbox}

    @staticmethod
    def accuracy(cls_score: Tensor, labels: Tensor) -> Tensor:
        """Top-1 classification accuracy of the sampled RoIs in percent, detached (mmdet's ``acc``: the correct
        count times 100 / N, not a mean, which rounds the same way); 0 without RoIs."""
        if labels.numel() == 0:
            return cls_score.new_zeros(()).detach()
        return (cls_score.detach().argmax(1) == labels).float().sum() * (100.0 / labels.numel())

    def regress(self, rois: Tensor, bbox_pred: Tensor, img_sizes: Sequence[tuple[int, int]] | Tensor,
                labels: Tensor | None = None) -> Tensor:
        """Decode ``bbox_pred`` on ``rois`` (K, 5), each box clipped to its own image's (h, w) (mmdet's
        ``regress_by_class``). Returns (K, 4) in the order of ``rois``; with per-class deltas the ones of
        ``labels`` (K,) are used, or, without labels, every class's box: (K, num_classes * 4)."""
        if not self.reg_class_agnostic and labels is not None:
            bbox_pred = bbox_pred.view(len(bbox_pred), -1, 4)[torch.arange(len(bbox_pred)), labels]
        # decoded in float32: under autocast the fp16 deltas would quantise 1333-px coordinates to 0.5-1 px
        if known_empty(rois.shape[0]):
            return rois.new_zeros(0, bbox_pred.shape[1], dtype=torch.float32)
        if isinstance(img_sizes, Tensor):  # (B, 2), as an exported graph takes the image size: an input
            sizes = img_sizes.to(device=rois.device, dtype=torch.float32)
        else:
            sizes = torch.tensor([tuple(s) for s in img_sizes], dtype=torch.float32, device=rois.device)
        return self.coder.decode(rois[:, 1:].float(), bbox_pred.float(), max_shape=sizes[rois[:, 0].long()])
