"""What ``htc_lightning._lightning_compat`` relies on in Lightning and jsonargparse still holds.

One test per workaround: when an upgrade removes or changes the private attribute, the test fails naming it
and the installed version, and the fix belongs in ``_lightning_compat.py``.
"""
from __future__ import annotations

from importlib.metadata import version

import pytest
import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.demos.boring_classes import BoringModel
from torch import nn

from htc_lightning._lightning_compat import (
    InternalsChanged,
    apply_ckpt_hparams_with_own_method,
    built_by_lightning_cli,
    checkpoint_schedule,
    cluster_environment,
    lightning_find_last_checkpoints,
    lightning_save_topk_checkpoint,
    model_checkpoint_with_own_hooks,
    run_slurm_requeue,
    save_last_checkpoint_only,
    stop_as_on_sigterm,
    uses_distributed_sampler,
)

LIGHTNING = f"pytorch-lightning {version('pytorch-lightning')}"
JSONARGPARSE = f"jsonargparse {version('jsonargparse')}"
QUIET_TRAINER = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                 "enable_model_summary": False}


class WrapsAModule(BoringModel):
    """Records, while being built, whether the CLI builds it; saves an ``nn.Module`` argument as DetectionModule
    does."""

    seen: list[bool] = []

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        WrapsAModule.seen.append(built_by_lightning_cli())
        self.save_hyperparameters()
        self.net = net


def test_built_by_lightning_cli_is_true_while_the_cli_builds_the_module_and_hparams_hold_its_config():
    WrapsAModule.seen = []
    WrapsAModule(nn.ReLU())
    cli = LightningCLI(WrapsAModule, args=["--model.net", "torch.nn.ReLU"], run=False, trainer_defaults=QUIET_TRAINER,
                       seed_everything_default=False)
    assert WrapsAModule.seen == [False, True], (
        f"{LIGHTNING}: LightningCLI no longer sets hparams_mixin._given_hyperparameters while it builds the model")
    net = cli.model.hparams["net"]
    assert isinstance(net, dict) and net.get("class_path") == "torch.nn.ReLU", (
        f"{LIGHTNING}: under LightningCLI, save_hyperparameters() stored {net!r} for an nn.Module argument, not its "
        "config: DetectionModule's checkpoints would no longer say which detector to rebuild")


def test_uses_distributed_sampler_reads_the_flag_the_trainer_was_created_with():
    for flag in (True, False):
        trainer = pl.Trainer(use_distributed_sampler=flag, **QUIET_TRAINER)
        assert uses_distributed_sampler(trainer) is flag, (
            f"{LIGHTNING}: Trainer._accelerator_connector.use_distributed_sampler does not hold "
            f"Trainer(use_distributed_sampler={flag})")


def test_a_missing_attribute_is_an_error_naming_it_and_the_installed_version():
    with pytest.raises(InternalsChanged, match=rf"_accelerator_connector\.use_distributed_sampler .* {LIGHTNING}"):
        uses_distributed_sampler(object())


def test_lightning_cli_calls_the_ckpt_path_hook_once_between_parsing_and_instantiation():
    calls = []

    @apply_ckpt_hparams_with_own_method
    class RecordingCLI(LightningCLI):
        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            calls.append("parse_arguments")

        def apply_ckpt_hparams(self) -> None:
            calls.append("apply_ckpt_hparams")

        def before_instantiate_classes(self) -> None:
            calls.append("before_instantiate_classes")

    RecordingCLI(BoringModel, args=[], run=False, trainer_defaults=QUIET_TRAINER, seed_everything_default=False)
    assert calls == ["parse_arguments", "apply_ckpt_hparams", "before_instantiate_classes"], (
        f"{LIGHTNING}: LightningCLI.__init__ no longer calls _parse_ckpt_path once between parse_arguments and "
        f"before_instantiate_classes (calls: {calls})")


def test_cluster_environment_is_the_one_the_trainer_was_built_with():
    from lightning_fabric.plugins.environments import SLURMEnvironment

    env = SLURMEnvironment(auto_requeue=True)
    trainer = pl.Trainer(plugins=[env], **QUIET_TRAINER)
    assert cluster_environment(trainer) is env, (
        f"{LIGHTNING}: Trainer._accelerator_connector.cluster_environment is not the plugin the Trainer was given")


def test_stop_as_on_sigterm_sets_the_flag_behind_trainer_received_sigterm():
    trainer = pl.Trainer(**QUIET_TRAINER)
    assert not trainer.received_sigterm
    stop_as_on_sigterm(trainer)
    assert trainer.received_sigterm, (
        f"{LIGHTNING}: Trainer._signal_connector.received_sigterm no longer backs trainer.received_sigterm")


def test_run_slurm_requeue_calls_lightnings_requeue_handler(monkeypatch):
    trainer = pl.Trainer(**QUIET_TRAINER)
    calls = []
    assert callable(getattr(trainer._signal_connector, "_slurm_sigusr_handler_fn", None)), (
        f"{LIGHTNING}: Trainer._signal_connector._slurm_sigusr_handler_fn is gone")
    monkeypatch.setattr(trainer._signal_connector, "_slurm_sigusr_handler_fn", lambda s, f: calls.append((s, f)))
    run_slurm_requeue(trainer, 10)
    assert calls == [(10, None)]


def test_checkpoint_schedule_reads_the_triggers_model_checkpoint_resolved():
    from pytorch_lightning.callbacks import ModelCheckpoint

    assert checkpoint_schedule(ModelCheckpoint(every_n_train_steps=3)) == (3, 0), (
        f"{LIGHTNING}: ModelCheckpoint(every_n_train_steps=3) no longer resolves _every_n_train_steps=3, "
        "_every_n_epochs=0")
    assert checkpoint_schedule(ModelCheckpoint()) == (0, 1), f"{LIGHTNING}: ModelCheckpoint's default triggers changed"


def test_save_last_checkpoint_only_writes_last_ckpt_and_leaves_the_step_open_for_the_best_one(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), monitor="never_logged", save_last=True, every_n_epochs=0)
    written, open_after = [], []

    class SaveAtStep2(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 2:
                written.append(save_last_checkpoint_only(checkpoint, trainer))
                open_after.append(not checkpoint._should_skip_saving_checkpoint(trainer))

    trainer = pl.Trainer(max_steps=3, default_root_dir=str(tmp_path), callbacks=[SaveAtStep2(), checkpoint],
                         **{**QUIET_TRAINER, "enable_checkpointing": True}, limit_val_batches=0)
    trainer.fit(BoringModel())
    assert written == [True] and (tmp_path / "last.ckpt").is_file(), (
        f"{LIGHTNING}: ModelCheckpoint._save_last_checkpoint no longer writes last.ckpt")
    assert open_after == [True], (
        f"{LIGHTNING}: after a last-only save, ModelCheckpoint treats the step as saved (_last_global_step_saved): a "
        "validation at that step would not write the best checkpoint")


def test_model_checkpoint_calls_the_own_find_last_and_save_topk_methods(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    calls = []

    @model_checkpoint_with_own_hooks
    class Recording(ModelCheckpoint):
        def find_last_checkpoints(self, trainer) -> set[str]:
            calls.append("find_last_checkpoints")
            return lightning_find_last_checkpoints(self, trainer)

        def save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
            calls.append("save_topk_checkpoint")
            lightning_save_topk_checkpoint(self, trainer, monitor_candidates)

    def fit(ckpt_path=None) -> None:
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, default_root_dir=str(tmp_path),
                             callbacks=[Recording(dirpath=str(tmp_path), save_last=True)],
                             **{**QUIET_TRAINER, "enable_checkpointing": True})
        trainer.fit(BoringModel(), ckpt_path=ckpt_path)

    fit()
    assert "save_topk_checkpoint" in calls and any(tmp_path.glob("epoch=0*.ckpt")), (
        f"{LIGHTNING}: ModelCheckpoint no longer saves through _save_topk_checkpoint (calls: {calls})")
    calls.clear()
    fit(ckpt_path="last")
    assert "find_last_checkpoints" in calls, (
        f"{LIGHTNING}: ckpt_path='last' no longer asks ModelCheckpoint._find_last_checkpoints (calls: {calls})")


def test_a_model_checkpoint_hook_without_its_method_is_an_error_naming_it():
    from pytorch_lightning.callbacks import ModelCheckpoint

    with pytest.raises(TypeError, match="no find_last_checkpoints"):
        model_checkpoint_with_own_hooks(type("Bare", (ModelCheckpoint,), {}))
