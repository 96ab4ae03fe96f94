"""HTC's semantic segmentation branch (Chen et al. 2019, Sec. 3.3; mmdet ``FusedSemanticHead``)."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interfaces import FeatureSpec
from ..layers.losses import cross_entropy


class FusedSemanticHead(nn.Module):
    """Every pyramid level -> 1×1 ``lateral_convs`` + ReLU, resized (bilinear, align_corners) to level
    ``fusion_level`` and summed; ``num_convs`` × (3×3 conv + ReLU); then ``conv_logits`` (1×1, the
    segmentation logits) and ``conv_embedding`` (1×1 + ReLU, the feature fused into the RoI features).

    Args:
        input: the pyramid it fuses (the RoI head passes its spec; only the width is used: ``num_classes`` here
            counts the segmentation labels, 183 for COCO-Stuff, not the detector's classes).
        seg_scale_factor: the labels are nearest-downsampled by it to the logits' stride (1/8 for P3).
        avg_non_ignore: ``False`` (mmdet's default and what the HTC model zoo was trained with) averages the
            cross entropy over ALL label pixels, ignored ones (``ignore_index``) included, so ignored pixels
            dilute the loss; ``True`` averages over the non-ignored pixels only (PyTorch's
            ``cross_entropy(ignore_index=...)`` behaviour).
    """

    def __init__(self, input: FeatureSpec, num_ins: int = 5, fusion_level: int = 1, num_convs: int = 4,
                 conv_out_channels: int = 256, num_classes: int = 183, ignore_index: int = 255,
                 loss_weight: float = 0.2, seg_scale_factor: float = 1 / 8, avg_non_ignore: bool = False) -> None:
        super().__init__()
        in_channels = input.width
        if not 0 <= fusion_level < num_ins:
            raise ValueError(f"FusedSemanticHead: fusion_level {fusion_level} is not one of the {num_ins} inputs")
        self.num_ins = num_ins
        self.fusion_level = fusion_level
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.loss_weight = loss_weight
        self.seg_scale_factor = seg_scale_factor
        self.avg_non_ignore = avg_non_ignore
        self.lateral_convs = nn.ModuleList(nn.Conv2d(in_channels, in_channels, 1) for _ in range(num_ins))
        self.convs = nn.ModuleList(nn.Conv2d(in_channels if i == 0 else conv_out_channels, conv_out_channels, 3,
                                             padding=1) for i in range(num_convs))
        self.conv_embedding = nn.Conv2d(conv_out_channels, conv_out_channels, 1)
        self.conv_logits = nn.Conv2d(conv_out_channels, num_classes, 1)
        self.class_sized_parameters = ("conv_logits.weight", "conv_logits.bias")  # one map per class
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # mmcv ConvModule default and mmdet's Kaiming init_cfg for conv_logits: normal, fan_out, relu
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Pyramid features (at least ``num_ins``) -> (seg logits (B, num_classes, h, w), feature (B, C, h, w)),
        both at the resolution of ``feats[fusion_level]``."""
        if len(feats) < self.num_ins:
            raise ValueError(f"FusedSemanticHead: expects {self.num_ins} feature levels, got {len(feats)}")
        x = torch.relu(self.lateral_convs[self.fusion_level](feats[self.fusion_level]))
        size = x.shape[-2:]
        for i in range(self.num_ins):
            if i == self.fusion_level:
                continue
            feat = F.interpolate(feats[i], size=size, mode="bilinear", align_corners=True)
            x = x + torch.relu(self.lateral_convs[i](feat))
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.conv_logits(x), torch.relu(self.conv_embedding(x))

    def loss(self, seg_pred: Tensor, labels: Tensor) -> Tensor:
        """``labels`` (B, H, W) at the padded input size (``ignore_index`` where unlabeled), nearest-downsampled
        by ``seg_scale_factor`` to the logits' size; weighted cross entropy (see ``avg_non_ignore``)."""
        if labels.dim() != 3:
            raise ValueError(f"FusedSemanticHead.loss: labels must be (B, H, W), got {tuple(labels.shape)}")
        small = F.interpolate(labels[:, None].float(), scale_factor=self.seg_scale_factor, mode="nearest")
        small = small[:, 0].long()
        if small.shape[-2:] != seg_pred.shape[-2:]:
            raise ValueError(f"FusedSemanticHead.loss: labels {tuple(labels.shape[-2:])} downsampled by "
                             f"{self.seg_scale_factor} give {tuple(small.shape[-2:])}, but the logits are "
                             f"{tuple(seg_pred.shape[-2:])}: pad the semantic map like the image")
        loss = cross_entropy(seg_pred, small, ignore_index=self.ignore_index, avg_non_ignore=self.avg_non_ignore)
        return self.loss_weight * loss
