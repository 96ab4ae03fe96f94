"""Backbones: each returns one feature map per output (increasing stride) and exposes ``out_channels``/``strides``."""
from htc_lightning.models.backbones.dcn import DeformConv2dPack
from htc_lightning.models.backbones.fishnet import FishNet, convert_fishnet_state_dict
from htc_lightning.models.backbones.timm_backbone import TimmBackbone

__all__ = ["DeformConv2dPack", "FishNet", "TimmBackbone", "convert_fishnet_state_dict"]
