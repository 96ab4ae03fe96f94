"""``16-mixed`` (fp16 autocast + GradScaler, what V100s run) on CPU through a real Lightning run, for every tiny
model family: HTC, HTC + GA-RPN (deformable feature adaption), Cascade Mask R-CNN and FishNet-HTC.

Lightning turns ``precision="16-mixed"`` on CPU into bf16; ``configs/cluster/precision_16-mixed_cpu.yaml``
keeps fp16 with a CPU GradScaler (``MixedPrecision`` plugin), and the tests go through it.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from htc_lightning.cli import HTCLightningCLI
from htc_lightning.models.proposals.ga_rpn import GARPN

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"
FP16_CPU = REPO / "configs" / "cluster" / "precision_16-mixed_cpu.yaml"
FAMILIES = {"htc": "htc_tiny_synthetic.yaml", "htc_ga_rpn": "htc_tiny_synthetic.yaml",
            "cascade": "cascade_tiny_synthetic.yaml", "fishnet_htc": "htc_fishnet99_tiny_synthetic.yaml"}


def family_config(family: str, tmp_path: Path, coco_root, **trainer) -> str:
    config = yaml.safe_load((TINY / FAMILIES[family]).read_text())
    if family == "htc_ga_rpn":
        ga = yaml.safe_load((TINY / "ga_rpn_tiny_synthetic.yaml").read_text())
        config["model"]["init_args"]["detector"]["init_args"]["rpn_head"] = \
            ga["model"]["init_args"]["detector"]["init_args"]["rpn_head"]
    config["trainer"].update(limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(tmp_path / "run"), **trainer)
    config["data"]["init_args"].update(data_root=str(coco_root), train_scales=[[64, 64]], test_scale=[64, 64],
                                       num_workers=0)
    path = tmp_path / f"{family}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def fp16_cli(family: str, tmp_path: Path, coco_root, *args: str, **trainer) -> HTCLightningCLI:
    return HTCLightningCLI(args=["--config", family_config(family, tmp_path, coco_root, **trainer),
                                 "--config", str(FP16_CPU), *args], run=False)


def with_scaler(**init_args) -> list[str]:
    plugin = yaml.safe_load(FP16_CPU.read_text())["trainer"]["plugins"]
    plugin[0]["init_args"]["scaler"]["init_args"].update(init_args)
    return ["--trainer.plugins", yaml.safe_dump(plugin)]


class ScalerRecord(pl.Callback):
    """Per optimiser step: the loss, the GradScaler's scale after its update, whether the weights moved."""

    def __init__(self) -> None:
        self.losses, self.scales, self.applied = [], [], []
        self._before: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters() if p.requires_grad]).clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters() if p.requires_grad])
        self.losses.append(float(outputs["loss"]))
        self.scales.append(trainer.precision_plugin.scaler.get_scale())
        self.applied.append(not torch.equal(after, self._before))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_16_mixed_on_cpu_trains_with_finite_losses_and_the_grad_scaler_settles(tmp_path, coco_root, family):
    # a fast back-off (x1/16 per overflow) so that FishNet's large from-scratch stem gradients settle in a few steps
    cli = fp16_cli(family, tmp_path, coco_root, *with_scaler(backoff_factor=1 / 16), max_steps=5)
    assert isinstance(cli.trainer.precision_plugin.scaler, torch.amp.GradScaler)
    record = ScalerRecord()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.precision_plugin.precision == "16-mixed"
    assert all(math.isfinite(v) for v in record.losses), record.losses
    # an overflow step backs the scale off and changes no weight; a good step keeps the scale and trains
    for before, after, applied in zip([65536.0, *record.scales], record.scales, record.applied):
        assert applied == (after == before), (record.scales, record.applied)
    assert record.applied[-1], record.scales  # settled: the last step was applied
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


def test_grad_scaler_overflow_steps_are_neither_nan_losses_nor_skipped_steps(tmp_path, coco_root):
    # a scale of 2**40 overflows fp16 gradients for sure; the back-off reaches a usable scale in 3 steps
    cli = fp16_cli("htc", tmp_path, coco_root, "--model.init_args.nan_policy", "skip",
                   *with_scaler(init_scale=2.0 ** 40, backoff_factor=2.0 ** -10), max_steps=4)
    record = ScalerRecord()
    cli.trainer.callbacks.append(record)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="skipping step")  # the NaN guard's warning must not appear
        cli.trainer.fit(cli.model, cli.datamodule)
    assert record.applied[:3] == [False, False, False] and record.applied[3], (record.scales, record.applied)
    assert cli.model.skipped_steps == 0
    assert float(cli.trainer.logged_metrics["train/skipped_steps"]) == 0.0


def normalised_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def fp32_and_fp16(fn, *args):
    """``fn(*args)`` in float32 and under fp16 autocast, on the same (float32) inputs."""
    reference = fn(*args)
    with torch.autocast("cpu", dtype=torch.float16):
        return reference, fn(*args)


def proposal_raw_error(rpn_head, raw, raw16) -> tuple[float, tuple[int, int]]:
    """The largest normalised error of the proposal head's maps, and GA's location-filter flips (count,
    near-ties). GA zeroes cls/reg where ``sigmoid(loc) < loc_filter_thr``: a location whose fp32 logit lies
    within fp16's error of the threshold may be kept on one side only, so cls/reg are compared where both sides
    decided alike, and every flip must be such a near-tie (its fp32 logit within 1e-2 of the logits' scale of
    the threshold's logit)."""
    if not isinstance(rpn_head, GARPN):
        return max(normalised_error(b, a) for la, lb in zip(raw, raw16) for a, b in zip(la, lb)), (0, 0)
    thr = rpn_head.loc_filter_thr
    thr_logit = math.log(thr / (1 - thr))
    cls, reg, shape, loc = raw
    cls16, reg16, shape16, loc16 = raw16
    errors, flips, near = [], 0, 0
    for level in range(len(loc)):
        errors += [normalised_error(loc16[level], loc[level]), normalised_error(shape16[level], shape[level])]
        flipped = (loc16[level].sigmoid() >= thr) != (loc[level].sigmoid() >= thr)
        flips += int(flipped.sum())
        near += int(((loc[level] - thr_logit).abs()[flipped] <= 1e-2 * loc[level].abs().max()).sum())
        alike = ~flipped
        for a, b in ((cls[level], cls16[level]), (reg[level], reg16[level])):
            errors.append(normalised_error(b * alike, a * alike))
    return max(errors), (flips, near)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_16_mixed_predictions_are_close_to_float32(tmp_path, coco_root, family):
    # Part by part on the same float32 inputs, so that one NMS near-tie (random weights score boxes alike) does not
    # reorder everything after it: the features, the proposal head's raw maps, and the cascade's class
    # probabilities, boxes and mask probabilities on the float32 proposals. fp16 keeps 11 bits (2**-11 = 4.9e-4).
    cli = fp16_cli(family, tmp_path, coco_root)
    detector = cli.model.detector.eval()
    cli.datamodule.setup("validate")
    images, targets = next(iter(cli.datamodule.val_dataloader()))
    img_sizes = [tuple(t["meta"]["img_size"]) for t in targets]
    with torch.no_grad():
        feats, feats16 = fp32_and_fp16(detector.extract_feats, images)
        raw, raw16 = fp32_and_fp16(detector.rpn_head, feats)
        roi_head, rpn = detector.roi_head, detector.rpn_head
        sem = roi_head.semantic(feats)
        semantic_feat = None if sem is None else sem[1]
        rois = torch.cat([torch.cat([p.new_full((len(p), 1), float(i)), p[:, :4]], 1)
                          for i, p in enumerate(rpn.proposals(raw, img_sizes, rpn.test_settings))])
        (scores, boxes), (scores16, boxes16) = fp32_and_fp16(roi_head.refine_and_score, feats, rois, img_sizes,
                                                             semantic_feat)
        final = torch.cat([rois[:, :1], boxes if boxes.dim() == 2 else boxes[:, 0]], 1)
        masks, masks16 = fp32_and_fp16(roi_head.mask_probs, feats, final, semantic_feat)
    raw_error, loc_flips = proposal_raw_error(detector.rpn_head, raw, raw16)
    errors = {"fpn": max(normalised_error(b, a) for a, b in zip(feats, feats16)), "proposal_raw": raw_error,
              "scores": float((scores16.float() - scores).abs().max()),
              "boxes_px": float((boxes16.float() - boxes).abs().max()),
              "mask_probs": float((masks16.float() - masks).abs().max()),
              "mask_pixels_flipped": float(((masks16.float() >= 0.5) != (masks >= 0.5)).float().mean())}
    print(family, errors, "loc flips (count, near-ties):", loc_flips)
    assert errors["fpn"] <= 1e-2 and errors["proposal_raw"] <= 1e-2, errors
    assert loc_flips[0] == loc_flips[1], f"GA location decisions flipped away from the threshold: {loc_flips}"
    assert errors["scores"] <= 1e-2, errors
    # Mask logits carry the features' absolute fp16 error: the random-init FishNet's features reach ~90 (HTC's
    # ResNet ~4), so one probability near 0.5 may move by ~0.07 while the binary masks stay the same
    # (random-init probabilities cluster at 0.5: ~5e-4 of the pixels sit on the 0.5 threshold in every family).
    assert errors["mask_probs"] <= 0.1 and errors["mask_pixels_flipped"] <= 2e-3, errors
    assert errors["boxes_px"] <= 0.5, errors  # on 64-pixel images
