"""Helpers shared by the RPN and GA-RPN tests."""
from pathlib import Path

import pytest
import torch

from htc_lightning.models.layers.samplers import RandomSampler
from htc_lightning.tools.mmdet_parity import Report, compare_proposals, compare_raw

ORACLE = Path(__file__).parent / "fixtures" / "oracle"


def load_oracle(name: str) -> dict:
    return torch.load(ORACLE / f"{name}.pt", weights_only=False)


def head_weights(state_dict: dict, prefix: str = "rpn_head.") -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def assert_same_proposal_set(head: torch.nn.Module, ours: torch.Tensor, ref: torch.Tensor, settings=None) -> None:
    """Same boxes and scores up to order (ties may reorder), tie-aware for NMS and the per-image cut of
    ``settings`` (default the head's test settings; the parity tool's comparison)."""
    rep = Report()
    compare_proposals(rep, head, [ours], [ref], settings=settings)
    assert not rep.failed, "\n".join(rep.lines)


def tiny_targets(boxes: list[list[float]], size: tuple[int, int]) -> dict:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": b, "labels": torch.zeros(len(b), dtype=torch.long), "meta": {"pad_size": size, "img_size": size}}


def assert_matches_oracle_inference(head: torch.nn.Module, dump: dict, prefix: str = "rpn_head.",
                                    device: str = "cpu") -> None:
    """The head with the dump's weights: raw outputs per level equal mmdet's at their scale (GA's location
    filter tie-aware), and the proposals from the reference's raw outputs are the same set."""
    head.load_state_dict(head_weights(dump["state_dict"], prefix), strict=True)
    head.to(device)
    rep = Report()
    with torch.no_grad():
        raw = head([f.to(device) for f in dump["fpn"]])
        compare_raw(rep, head, raw, dump["rpn_raw"], dump.get("config", ""))
        ref_raw = tuple([t.to(device) for t in levels] for levels in dump["rpn_raw"])
        img_size = tuple(dump["img_metas"][0]["img_shape"])
        props = head.proposals(ref_raw, [img_size], head.test_settings)
        compare_proposals(rep, head, props, dump["proposals"], dump["rpn_raw"][0])
    assert not rep.failed, "\n".join(rep.lines)


def keep_all() -> dict:
    """Samplers that keep every anchor (mmdet with a 10**7 budget): deterministic losses, as the oracle's dumps.
    Pass as ``RPN(..., **keep_all())`` or ``GARPN(..., **keep_all_ga())``."""
    return {"sampler": RandomSampler(None, 0.5, add_gt_as_proposals=False)}


def keep_all_ga() -> dict:
    return {**keep_all(), "ga_sampler": RandomSampler(None, 0.5, add_gt_as_proposals=False)}


def assert_keeps_every_sample(head: torch.nn.Module) -> None:
    budgets = {name: getattr(head, name).num for name in ("sampler", "ga_sampler") if hasattr(head, name)}
    assert all(num is None for num in budgets.values()), f"build the head with keep_all(): budgets {budgets}"


def assert_losses_match_oracle(head: torch.nn.Module, dump: dict, names: set[str]) -> None:
    """With every sample kept, the head's losses on the dump's raw outputs and boxes are mmdet's (rel 1e-4)."""
    head.train()
    assert_keeps_every_sample(head)
    targets = [tiny_targets(dump["boxes"].tolist(), dump["img_size"])]
    losses = head.loss(tuple(dump["raw"]), targets, [dump["img_size"]])
    assert set(losses) == names
    for key, value in losses.items():
        assert value.item() == pytest.approx(dump["losses"][key], rel=1e-4), key


def total_losses_over_steps(head: torch.nn.Module, feats: list[torch.Tensor], lr: float,
                            steps: int = 10) -> list[float]:
    """Summed losses of ``steps`` SGD steps (momentum 0.9) on two boxes in a 64x64 image, every sample kept."""
    head.train()
    assert_keeps_every_sample(head)
    targets = [tiny_targets([[8.0, 8.0, 40.0, 36.0], [30.0, 20.0, 60.0, 60.0]], (64, 64))]
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    totals = []
    for _ in range(steps):
        loss = sum(head.loss(head(feats), targets, [(64, 64)]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    return totals
