"""Mask targets for training and pasting of predicted masks into the image."""
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

# gt masks are turned into float a few at a time: a COCO image has up to ~100 instances at ~1333x800.
GT_CHUNK = 16


def mask_targets(pos_boxes: Tensor, pos_assigned_gt_inds: Tensor, gt_masks: Tensor, mask_size: int = 28) -> Tensor:
    """(P, S, S) float 0/1 targets: RoIAlign of each positive's gt mask (``gt_masks`` (G, H, W) uint8) on its
    box, then >= 0.5 (mmdet's ``BitmapMasks.crop_and_resize`` + binarize)."""
    num_pos = pos_boxes.shape[0]
    device = pos_boxes.device
    if num_pos == 0:
        return pos_boxes.new_zeros(0, mask_size, mask_size, dtype=torch.float32)
    if gt_masks.shape[0] == 0:
        raise ValueError(f"mask_targets: {num_pos} positive boxes but no gt masks")
    height, width = gt_masks.shape[-2:]
    # mmdet clips the proposals to the mask canvas before cropping (clamp(0, m) is min(max(x, 0), m))
    boxes = torch.minimum(pos_boxes.detach().float().clamp(min=0),
                          torch.tensor([width, height, width, height], dtype=torch.float32, device=device))
    gt_inds = pos_assigned_gt_inds.to(device=device, dtype=torch.long)
    if gt_masks.shape[0] <= GT_CHUNK:
        # few gts: pool from all of them at once, each RoI from its own gt's canvas (no data-dependent
        # selection of the used ones, which would wait for the device)
        canvas = gt_masks.to(device=device, dtype=torch.float32)[:, None]
        rois = torch.cat([gt_inds.float()[:, None], boxes], dim=1)
        return (roi_align(canvas, rois, (mask_size, mask_size), 1.0, 0, True)[:, 0] >= 0.5).float()
    targets = torch.empty(num_pos, mask_size, mask_size, device=device)
    used = torch.unique(gt_inds)
    local = torch.full((gt_masks.shape[0],), -1, dtype=torch.long, device=device)
    # mmdet gathers one full-size float mask per positive; pooling each gt once (a batch index per RoI) gives
    # the same numbers with G instead of P full-size masks, a chunk of them at a time.
    for start in range(0, len(used), GT_CHUNK):
        chunk = used[start:start + GT_CHUNK]
        local.fill_(-1)
        local[chunk] = torch.arange(len(chunk), device=device)
        rows = (local[gt_inds] >= 0).nonzero().squeeze(1)
        canvas = gt_masks[chunk.to(gt_masks.device)].to(device=device, dtype=torch.float32)[:, None]
        rois = torch.cat([local[gt_inds[rows]].float()[:, None], boxes[rows]], dim=1)
        pooled = roi_align(canvas, rois, (mask_size, mask_size), 1.0, 0, True)[:, 0]
        targets[rows] = (pooled >= 0.5).float()
    return targets


def _paste_windows(boxes: Tensor, img_h: int, img_w: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # mmdet's CPU path pastes one mask at a time inside its box grown by one pixel (skip_empty=True); every
    # pixel outside that window stays 0. We keep those windows whatever the chunk size, so the output does
    # not depend on chunking.
    x0 = (boxes[:, 0].floor() - 1).clamp(min=0).long()
    y0 = (boxes[:, 1].floor() - 1).clamp(min=0).long()
    x1 = (boxes[:, 2].ceil() + 1).clamp(max=img_w).long()
    y1 = (boxes[:, 3].ceil() + 1).clamp(max=img_h).long()
    return x0, y0, x1, y1


def _relative(coords: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    # pixel centres in the box's [-1, 1] frame (grid_sample, align_corners=False), as mmdet's _do_paste_mask
    grid = (coords - lo[:, None]) / (hi - lo)[:, None] * 2 - 1
    return torch.where(torch.isinf(grid), torch.zeros_like(grid), grid)


def paste_masks(masks: Tensor, boxes: Tensor, img_h: int, img_w: int, threshold: float = 0.5,
                chunk_size: int = 32) -> Tensor:
    """(N, S, S) mask probabilities, (N, 4) boxes in the target frame -> (N, img_h, img_w) bool, as mmdet's
    ``_do_paste_mask`` (grid_sample, align_corners=False), a chunk of masks at a time so memory stays bounded.
    ``threshold < 0`` returns the soft (float) masks instead."""
    if masks.dim() != 3 or boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"paste_masks: masks {tuple(masks.shape)} must be (N, S, S) and boxes "
                         f"{tuple(boxes.shape)} (N, 4)")
    if chunk_size < 1:
        raise ValueError(f"paste_masks: chunk_size must be >= 1, got {chunk_size}")
    binary = threshold >= 0
    num = masks.shape[0]
    device = masks.device
    out = torch.zeros(num, img_h, img_w, device=device, dtype=torch.bool if binary else torch.float32)
    if num == 0:
        return out
    boxes = boxes.float()
    x0i, y0i, x1i, y1i = _paste_windows(boxes, img_h, img_w)
    widths, heights = (x1i - x0i).clamp(min=0), (y1i - y0i).clamp(min=0)
    # host copies: one device sync instead of one per mask
    x0s, y0s, ws, hs = torch.stack([x0i, y0i, widths, heights]).tolist()
    for start in range(0, num, chunk_size):
        sl = slice(start, start + chunk_size)
        win_w, win_h = max(ws[sl]), max(hs[sl])
        if win_w == 0 or win_h == 0:
            continue
        # each mask samples its own window (padded to the chunk's largest); a pixel's value depends only on
        # its coordinates and its box, so it equals mmdet's one-mask-at-a-time result bit for bit.
        xs = (x0i[sl, None] + torch.arange(win_w, device=device)).float() + 0.5
        ys = (y0i[sl, None] + torch.arange(win_h, device=device)).float() + 0.5
        gx = _relative(xs, boxes[sl, 0], boxes[sl, 2])
        gy = _relative(ys, boxes[sl, 1], boxes[sl, 3])
        n = gx.shape[0]
        grid = torch.stack([gx[:, None, :].expand(n, win_h, win_w), gy[:, :, None].expand(n, win_h, win_w)], dim=3)
        pasted = F.grid_sample(masks[sl, None].float(), grid, align_corners=False)[:, 0]
        del grid
        if binary:
            pasted = pasted >= threshold
        for k in range(n):
            i = start + k
            h, w = hs[i], ws[i]
            if h and w:
                out[i, y0s[i]:y0s[i] + h, x0s[i]:x0s[i] + w] = pasted[k, :h, :w]
    return out
