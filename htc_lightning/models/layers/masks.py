"""Mask targets for training and pasting of predicted masks into the image."""
from torch import Tensor


def mask_targets(pos_boxes: Tensor, pos_assigned_gt_inds: Tensor, gt_masks: Tensor, mask_size: int = 28) -> Tensor:
    """(P, S, S) float 0/1 targets: RoIAlign of each positive's gt mask (``gt_masks`` (G, H, W) uint8) on its
    box, then >= 0.5 (mmdet's ``BitmapMasks.crop_and_resize`` + binarize)."""
    raise NotImplementedError


def paste_masks(masks: Tensor, boxes: Tensor, img_h: int, img_w: int, threshold: float = 0.5,
                chunk_size: int = 32) -> Tensor:
    """(N, S, S) mask probabilities, (N, 4) boxes in the target frame -> (N, img_h, img_w) bool, as mmdet's
    ``_do_paste_mask`` (grid_sample, align_corners=False), a chunk of masks at a time so memory stays bounded.
    ``threshold < 0`` returns the soft (float) masks instead."""
    raise NotImplementedError
