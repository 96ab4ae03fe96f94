"""Optimizer, scheduler and parameter groups from YAML: the learning rate and weight decay each parameter group
actually gets at each step, for mmdet's default recipe and for AdamW + cosine with a backbone multiplier and no
decay on norms; a resumed run continues the schedule exactly."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import yaml
from test_cli_real_htc import tiny_htc_config
from torch import nn

from htc_lightning.cli import HTCLightningCLI
from htc_lightning.optim import ParamGroupRule, param_groups

STEPS_PER_EPOCH = 2  # coco_root: 4 training images, batch 2


class LrRecorder(pl.Callback):
    """The (lr, weight_decay) of every group, by group name, for the optimiser step each batch makes."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[float, float]]] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        groups = trainer.optimizers[0].param_groups
        self.steps.append({g.get("name", str(i)): (g["lr"], g.get("weight_decay", 0.0)) for i, g in enumerate(groups)})


def _run(config: str, *extra: str, ckpt_path: str | None = None) -> tuple[LrRecorder, HTCLightningCLI]:
    cli = HTCLightningCLI(args=["--config", config, *extra], run=False)
    recorder = LrRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return recorder, cli


def _config(tmp_path, coco_root, model: dict, max_steps: int = 6) -> str:
    path = tiny_htc_config(tmp_path, coco_root, max_steps=max_steps, limit_val_batches=0)
    config = yaml.safe_load(open(path))
    config["model"]["init_args"].update(model)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def test_rules_norms_and_biases_get_their_multipliers():
    model = nn.ModuleDict({"backbone": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
                           "head": nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2))})
    groups = param_groups(model, [ParamGroupRule(r"^backbone\.", lr_mult=0.1)], norm_decay_mult=0.0,
                          bias_decay_mult=0.5)
    got = {name: (g["lr_mult"], g["decay_mult"]) for g in groups for name, p in model.named_parameters()
           if any(p is q for q in g["params"])}
    assert got == {"backbone.0.weight": (0.1, 1.0), "backbone.0.bias": (0.1, 0.5),
                   "backbone.1.weight": (0.1, 0.0), "backbone.1.bias": (0.1, 0.0),
                   "head.0.weight": (1.0, 1.0), "head.0.bias": (1.0, 0.5),
                   "head.1.weight": (1.0, 0.0), "head.1.bias": (1.0, 0.0)}


def test_a_pattern_matching_nothing_is_an_error_showing_real_names():
    with pytest.raises(ValueError, match="match no trainable parameter name") as error:
        param_groups(nn.Sequential(nn.Linear(2, 2)), [ParamGroupRule(r"^backbon\.")])
    assert "backbon" in str(error.value) and "'0.weight'" in str(error.value)


def test_default_recipe_is_mmdet_sgd_with_warmup_and_a_backbone_multiplier(tmp_path, coco_root):
    config = _config(tmp_path, coco_root, {"warmup_iters": 4, "warmup_ratio": 0.1, "max_epochs_schedule": [2],
                                           "param_groups": [{"pattern": "^backbone", "lr_mult": 0.1}]})
    recorder, cli = _run(config)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    base = 0.01 * 2 / 16  # lr 0.01 at base_batch_size 16, batch 2
    for step, groups in enumerate(recorder.steps):
        warmup = 1 - (1 - 0.1) * (1 - step / 4) if step < 4 else 1.0
        decay = 0.1 if step // STEPS_PER_EPOCH >= 2 else 1.0
        assert groups["^backbone"][0] == pytest.approx(0.1 * base * warmup * decay, rel=1e-6)
        assert groups["default"][0] == pytest.approx(base * warmup * decay, rel=1e-6)
        assert groups["default"][1] == groups["^backbone"][1] == pytest.approx(1e-4)
    assert len(recorder.steps) == 6


ADAMW_COSINE = {"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.004, "weight_decay": 0.05}},
                "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                                 "init_args": {"T_max": 3}},
                "warmup_iters": 3, "warmup_ratio": 0.25,
                "param_groups": [{"pattern": "^backbone", "lr_mult": 0.1}], "norm_decay_mult": 0.0}


def _adamw_cosine_expected(step: int) -> dict[str, tuple[float, float]]:
    base = 0.004 * 2 / 16
    warmup = 0.25 + 0.75 * min(step, 3) / 3  # torch's LinearLR, per step
    cosine = (1 + math.cos(math.pi * (step // STEPS_PER_EPOCH) / 3)) / 2  # per epoch
    lr = base * warmup * cosine
    # the tiny HTC's norms are all in the backbone (BatchNorm); its FPN and heads have none
    return {"^backbone": (0.1 * lr, 0.05), "^backbone/norm": (0.1 * lr, 0.0), "default": (lr, 0.05)}


def _assert_close(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, (lr, wd) in expected.items():
        assert got[name][0] == pytest.approx(lr, rel=1e-6, abs=1e-12), name
        assert got[name][1] == pytest.approx(wd), name


def test_adamw_cosine_backbone_multiplier_and_no_decay_on_norms_from_yaml(tmp_path, coco_root):
    recorder, cli = _run(_config(tmp_path, coco_root, ADAMW_COSINE))
    assert type(cli.trainer.optimizers[0]) is torch.optim.AdamW
    assert len(recorder.steps) == 6
    for step, groups in enumerate(recorder.steps):
        _assert_close(groups, _adamw_cosine_expected(step))


def test_a_resumed_run_continues_the_schedule_where_it_stopped(tmp_path, coco_root):
    config = _config(tmp_path, coco_root, ADAMW_COSINE, max_steps=3)
    _run(config)
    resumed, _ = _run(config, "--trainer.max_steps", "6",
                      ckpt_path=str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert len(resumed.steps) == 3
    for step, groups in enumerate(resumed.steps, start=3):
        _assert_close(groups, _adamw_cosine_expected(step))


def test_an_optimizer_typo_is_an_error_at_parse_time(tmp_path, coco_root):
    config = _config(tmp_path, coco_root, {"optimizer": {"class_path": "torch.optim.AdamWW"}})
    with pytest.raises(SystemExit):
        HTCLightningCLI(args=["--config", config], run=False)


def test_the_recipe_fragments_stack_on_a_full_config(tmp_path, coco_root):
    from pathlib import Path

    root = Path(__file__).parents[1] / "configs"
    cli = HTCLightningCLI(args=["--config", str(root / "tiny" / "htc_tiny_synthetic.yaml"),
                                "--config", str(root / "recipes" / "adamw_cosine.yaml"),
                                "--config", str(root / "recipes" / "long_tail_sampling.yaml"),
                                "--data.init_args.data_root", str(coco_root)], run=False)
    cli.trainer.strategy.connect(cli.model)
    cli.model.trainer = cli.trainer
    cli.trainer.datamodule = cli.datamodule
    optimizer = cli.model.configure_optimizers()[0][0]
    assert type(optimizer) is torch.optim.AdamW
    # the backbone's convolutions have no bias (a norm follows each)
    assert {g["name"] for g in optimizer.param_groups} == {"^backbone\\.", "^backbone\\./norm", "default/bias",
                                                          "default"}
    assert cli.datamodule.repeat_factor_threshold == 0.001 and cli.datamodule.filter_empty_gt is False
