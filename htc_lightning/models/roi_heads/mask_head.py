"""The mask head of one cascade stage: mmdet's ``FCNMaskHead`` (Mask R-CNN, He et al. 2017) and, with
``with_conv_res``, ``HTCMaskHead`` (the mask information flow of HTC, Chen et al. 2019, Sec. 3.2)."""
from collections.abc import Sequence
from itertools import accumulate

import torch
from torch import Tensor, nn

from ..interfaces import FeatureSpec
from ..layers.losses import mask_cross_entropy
from ..layers.masks import GT_CHUNK, mask_targets
from ..layers.samplers import SamplingResult


class FCNMaskHead(nn.Module):
    """``num_convs`` × (3×3 conv + ReLU) -> 2× ``upsample`` (deconv + ReLU) -> ``conv_logits`` (1×1, one
    channel per class). ``with_conv_res`` adds HTC's ``conv_res`` (1×1 conv + ReLU) that maps the previous
    stage's last conv feature into this head's input: ``x + relu(conv_res(r))``. ``input`` gives the RoI
    features' width and the class count (the RoI head passes its own spec).

    ``forward`` returns (logits or ``None``, feature) where the feature is the last conv's output (after its
    ReLU, before the deconv): what the next stage's ``conv_res`` consumes.
    """

    def __init__(self, input: FeatureSpec, conv_channels: int = 256,
                 num_convs: int = 4, with_conv_res: bool = False, mask_size: int = 28,
                 loss_weight: float = 1.0) -> None:
        super().__init__()
        num_classes, in_channels = input.num_classes, input.width
        if with_conv_res and conv_channels != in_channels:
            # conv_res's output is added to this head's RoI feature (mmdet's HTCMaskHead)
            raise ValueError(f"FCNMaskHead: with_conv_res (mask information flow) adds a {conv_channels}-channel "
                             f"feature to the {in_channels}-channel RoI feature: set conv_channels={in_channels}")
        self.num_classes = num_classes
        self.mask_size = mask_size
        self.loss_weight = loss_weight
        self.convs = nn.ModuleList(nn.Conv2d(in_channels if i == 0 else conv_channels, conv_channels, 3, padding=1)
                                   for i in range(num_convs))
        last = conv_channels if num_convs else in_channels
        self.with_conv_res = with_conv_res
        if with_conv_res:
            self.conv_res = nn.Conv2d(conv_channels, conv_channels, 1)
        self.upsample = nn.ConvTranspose2d(last, conv_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_channels, num_classes, 1)
        self.class_sized_parameters = ("conv_logits.weight", "conv_logits.bias")  # one map per class
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # mmcv's ConvModule and FCNMaskHead.init_weights: Kaiming-normal (fan_out, relu), zero bias
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, res_feat: Tensor | None = None, with_logits: bool = True,
                labels: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        """Logits (N, num_classes, S, S), or with ``labels`` (N,) only each RoI's class, (N, S, S): at test time
        a detection needs one channel, and the 1x1 ``conv_logits`` over all classes is a large share of the
        head's work."""
        if res_feat is not None:
            if not self.with_conv_res:
                raise ValueError("FCNMaskHead: got the previous stage's feature (mask information flow) but this "
                                 "head was built with with_conv_res=False")
            x = x + torch.relu(self.conv_res(res_feat))
        for conv in self.convs:
            x = torch.relu(conv(x))
        feat = x
        if not with_logits:
            return None, feat
        up = torch.relu(self.upsample(x))
        if labels is None:
            return self.conv_logits(up), feat
        weight = self.conv_logits.weight[labels, :, 0, 0]                     # (N, C)
        logits = torch.bmm(weight[:, None, :], up.flatten(2)).view(up.shape[0], *up.shape[-2:])
        return logits + self.conv_logits.bias[labels, None, None], feat

    def loss(self, mask_logits: Tensor, samples: Sequence[SamplingResult], gt_masks: Sequence[Tensor]) -> Tensor:
        """BCE on each positive's gt-class channel against its gt mask RoIAligned to ``mask_size`` and binarised,
        averaged over positives and pixels (mmdet ``CrossEntropyLoss(use_mask=True)``)."""
        if mask_logits.shape[0] == 0:
            return mask_logits.sum() * 0
        if len({tuple(m.shape[1:]) for m in gt_masks}) == 1 and sum(len(m) for m in gt_masks) <= GT_CHUNK:
            # one canvas stack for the whole batch (images of one padded size): the same RoIAligns, fewer ops
            offsets = list(accumulate((len(m) for m in gt_masks[:-1]), initial=0))
            targets = mask_targets(torch.cat([s.pos_boxes for s in samples]),
                                   torch.cat([s.pos_assigned_gt_inds + o for s, o in zip(samples, offsets)]),
                                   torch.cat(list(gt_masks)), self.mask_size)
        else:
            targets = torch.cat([mask_targets(s.pos_boxes, s.pos_assigned_gt_inds, m, self.mask_size)
                                 for s, m in zip(samples, gt_masks) if len(s.pos_boxes)])
        labels = torch.cat([s.pos_gt_labels for s in samples if len(s.pos_boxes)])
        return self.loss_weight * mask_cross_entropy(mask_logits, targets, labels)
