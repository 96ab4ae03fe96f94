"""``fit --ckpt_path FILE`` trains the configured model: changes that load are reported once and used (and the run's
config.yaml records them); weights that do not fit are an error naming the keys. ``test`` still takes the detector
from the checkpoint."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FakeRoIHead, fake_cli_config
from torch import nn

from htc_lightning.checkpoints.resume_check import CheckpointMismatchError
from htc_lightning.cli import HTCLightningCLI


class BiggerRoIHead(FakeRoIHead):
    """One weight more than the checkpoint's head: its weights cannot fill this one."""

    def __init__(self, num_classes: int = 80, init_offset: float = 3.0) -> None:
        super().__init__(num_classes, init_offset)
        self.extra = nn.Parameter(torch.zeros(3))


def trained(tmp_path: Path) -> tuple[dict, Path]:
    """A finished 2-step run; returns its config (as a dict) and its last.ckpt."""
    config_path = fake_cli_config(tmp_path, max_steps=2, limit_val_batches=0)
    HTCLightningCLI(args=["fit", "--config", config_path])
    return yaml.safe_load(Path(config_path).read_text()), tmp_path / "run" / "checkpoints" / "last.ckpt"


def resume(tmp_path: Path, config: dict, ckpt: Path, *args: str) -> HTCLightningCLI:
    config["trainer"]["max_steps"] = 4
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    return HTCLightningCLI(args=["fit", "--config", str(path), "--ckpt_path", str(ckpt), *args])


def test_fit_resume_trains_the_configured_detector_and_reports_the_changes_once(tmp_path):
    config, ckpt = trained(tmp_path)
    detector = config["model"]["init_args"]["detector"]["init_args"]
    detector["with_mask"] = False
    detector["roi_head"]["init_args"] = {"init_offset": 1.0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = resume(tmp_path, config, ckpt)
    reports = [str(w.message) for w in caught if "differs from the checkpoint's" in str(w.message)]
    assert len(reports) == 1, reports
    assert f"--ckpt_path {ckpt}: the configured model differs" in reports[0]
    assert "detector.init_args.with_mask: True (checkpoint) -> False (config)" in reports[0]
    assert "detector.init_args.roi_head.init_args.init_offset: 3.0 (checkpoint) -> 1.0 (config)" in reports[0]
    assert cli.model.detector.with_mask is False and cli.trainer.global_step == 4
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["model"]["init_args"]["detector"]["init_args"]["with_mask"] is False


def test_fit_resume_applies_a_new_lr_and_weight_decay_to_the_restored_optimiser_and_schedule(tmp_path):
    config, ckpt = trained(tmp_path)
    restored = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    assert restored["state"], "the checkpoint has momentum buffers to keep"
    with pytest.warns(UserWarning, match=r"(?s)lr: 0\.01 \(checkpoint\) -> 0\.001 \(config\).*weight_decay: 0\.0001 "
                                         r"\(checkpoint\) -> 0\.001 \(config\).*lr, weight_decay: applied to the "
                                         r"optimiser and lr schedule restored from the checkpoint"):
        cli = resume(tmp_path, config, ckpt, "--model.init_args.lr", "0.001", "--model.init_args.weight_decay", "0.001")
    module, optimizer = cli.model, cli.trainer.optimizers[0]
    group = optimizer.param_groups[0]
    assert group["initial_lr"] == pytest.approx(module.scaled_lr()) and group["weight_decay"] == 0.001
    assert cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(module.scaled_lr())]
    # after the 2 resumed steps the lr is the new base at step 4 of the (warm-up) schedule
    warmup = 1 - (1 - module.warmup_ratio) * (1 - 4 / module.warmup_iters)  # mmdet's linear warm-up, step 4
    assert group["lr"] == pytest.approx(module.scaled_lr() * warmup)
    assert group["momentum"] == 0.9 and optimizer.state  # the momentum buffers came back


def test_fit_resume_with_weights_that_do_not_fit_fails_naming_the_keys_and_the_setting(tmp_path):
    config, ckpt = trained(tmp_path)
    config["model"]["init_args"]["detector"]["init_args"]["roi_head"]["class_path"] = "test_resume_config.BiggerRoIHead"
    with pytest.raises(CheckpointMismatchError, match=r"(?s)the checkpoint's weights do not fit the configured model: "
                                                      r"1 weight\(s\) missing in the checkpoint: "
                                                      r"detector\.roi_head\.extra"
                                                      r".*detector\.init_args\.roi_head\.class_path: "
                                                      r"'conftest\.FakeRoIHead' \(checkpoint\) -> "
                                                      r"'test_resume_config\.BiggerRoIHead' \(config\)"
                                                      r".*model\.init_args\.load_from"):
        resume(tmp_path, config, ckpt)
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2  # untouched


def test_test_with_ckpt_path_still_takes_the_detector_from_the_checkpoint(tmp_path):
    config, ckpt = trained(tmp_path)
    config["model"]["init_args"]["detector"]["init_args"]["roi_head"]["class_path"] = "test_resume_config.BiggerRoIHead"
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(config))
    tested = HTCLightningCLI(args=["test", "--config", str(path), "--ckpt_path", str(ckpt)])
    assert type(tested.model.detector.roi_head) is FakeRoIHead


def test_fit_resume_from_a_checkpoint_with_the_old_lambdalr_schedule_fails_pointing_to_load_from(tmp_path):
    # before issue 27 the default schedule was one LambdaLR per step; Lightning would load its state into the
    # warm-up and restart the epoch decay at 0
    config, ckpt = trained(tmp_path)
    state = torch.load(ckpt, weights_only=False)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.00125)
    old = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.001 + 0.999 * step / 500)
    old.step(), old.step()
    state["lr_schedulers"] = [old.state_dict()]
    torch.save(state, ckpt)
    with pytest.raises(CheckpointMismatchError, match=r"lr schedule of an older htc-lightning \(one LambdaLR.*"
                                                      rf"--model\.init_args\.load_from {ckpt}"):
        resume(tmp_path, config, ckpt)
    tested = HTCLightningCLI(args=["test", "--config", str(tmp_path / "resume.yaml"), "--ckpt_path", str(ckpt)])
    assert tested.trainer.state.finished  # test and predict never restore a schedule
