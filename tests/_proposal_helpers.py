"""Helpers shared by the RPN and GA-RPN tests."""
from pathlib import Path

import torch
from torchvision.ops import box_iou

ORACLE = Path(__file__).parent / "fixtures" / "oracle"


def load_oracle(name: str) -> dict:
    return torch.load(ORACLE / f"{name}.pt", weights_only=False)


def head_weights(state_dict: dict, prefix: str = "rpn_head.") -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def assert_same_proposal_set(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Same boxes and scores up to order (ties may reorder): a one-to-one match by IoU and score."""
    assert ours.shape == ref.shape
    iou = box_iou(ours[:, :4], ref[:, :4])
    iou = torch.where((ours[:, None, 4] - ref[None, :, 4]).abs() <= 1e-4, iou, torch.zeros_like(iou))
    best, match = iou.max(dim=1)
    assert best.min() > 0.99
    assert match.unique().numel() == ref.shape[0]


def tiny_targets(boxes: list[list[float]], size: tuple[int, int]) -> dict:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": b, "labels": torch.zeros(len(b), dtype=torch.long), "meta": {"pad_size": size, "img_size": size}}
