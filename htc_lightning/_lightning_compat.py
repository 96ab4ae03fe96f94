"""The one place where htc-lightning relies on Lightning's and jsonargparse's private internals (torchmetrics' are
not used: ``CocoEvaluator`` overrides only the public ``Metric.sync``).

Each function is one workaround for something neither library offers publicly; its docstring names the private
attribute, why we need it, and the versions checked. ``tests/test_lightning_compat.py`` has one test per function
that fails, naming the attribute and the installed version, when an upgrade removes or changes what the function
relies on. Adapt the function here, never its callers.
"""
from __future__ import annotations

from importlib.metadata import version
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pytorch_lightning.cli import LightningCLI

# The versions each workaround was read against and tested with (constraints.txt pins them).
CHECKED = {"pytorch-lightning": "2.6.6", "jsonargparse": "4.53.0"}

CLI = TypeVar("CLI", bound="type[LightningCLI]")


class InternalsChanged(RuntimeError):
    """A private attribute that ``_lightning_compat`` relies on is gone or behaves otherwise."""


def changed(attribute: str, library: str) -> InternalsChanged:
    """The error for ``attribute`` of ``library``: names it, the installed version and the checked one."""
    return InternalsChanged(f"{attribute} is gone or changed in {library} {version(library)} (the workaround was "
                            f"checked with {CHECKED[library]}); adapt htc_lightning/_lightning_compat.py")


def built_by_lightning_cli() -> bool:
    """True while ``LightningCLI`` instantiates the module that calls this (from its ``__init__``).

    Relies on ``pytorch_lightning.core.mixins.hparams_mixin._given_hyperparameters``, the ContextVar through which
    the CLI hands its parsed config to ``save_hyperparameters`` (set only while the CLI builds the model or the
    datamodule). Then the hparams hold the detector as its config (``class_path``/``init_args``), which lets
    ``test/predict --ckpt_path`` rebuild it; from Python they would hold the ``nn.Module`` itself, which must be
    ignored instead. No public API says which case applies. Checked: pytorch-lightning 2.6.6.
    """
    try:
        from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:
        raise changed("pytorch_lightning.core.mixins.hparams_mixin._given_hyperparameters",
                      "pytorch-lightning") from None
    return _given_hyperparameters.get() is not None


def uses_distributed_sampler(trainer: Any) -> bool:
    """The ``use_distributed_sampler`` flag the ``trainer`` was created with.

    Relies on ``trainer._accelerator_connector.use_distributed_sampler``: the Trainer keeps the flag only there
    and exposes no public property for it. ``CocoDataModule`` shards its batches itself and must tell the user to
    switch it off rather than let Lightning replace its batch sampler. Checked: pytorch-lightning 2.6.6.
    """
    try:
        return bool(trainer._accelerator_connector.use_distributed_sampler)
    except AttributeError:
        raise changed("Trainer._accelerator_connector.use_distributed_sampler", "pytorch-lightning") from None


def apply_ckpt_hparams_with_own_method(cli_class: CLI) -> CLI:
    """Class decorator: ``--ckpt_path``'s hyper-parameters are applied by ``cli_class.apply_ckpt_hparams()``.

    Relies on ``LightningCLI._parse_ckpt_path``, which ``LightningCLI.__init__`` calls right after parsing and
    before ``before_instantiate_classes``; it applies every hyper-parameter stored in the checkpoint over the
    config, and no public hook or flag replaces it or turns it off. Our method takes only some of them (see
    ``HTCLightningCLI.apply_ckpt_hparams``). Checked: pytorch-lightning 2.6.6.
    """
    from pytorch_lightning.cli import LightningCLI

    if not callable(getattr(LightningCLI, "_parse_ckpt_path", None)):
        raise changed("LightningCLI._parse_ckpt_path", "pytorch-lightning")
    own = getattr(cli_class, "apply_ckpt_hparams", None)
    if not callable(own):
        raise TypeError(f"{cli_class.__qualname__} has no apply_ckpt_hparams() method to apply --ckpt_path with")
    cli_class._parse_ckpt_path = own
    return cli_class


def cluster_environment(trainer: Any) -> Any:
    """The cluster environment (``SLURMEnvironment``, ``LightningEnvironment``, ...) the ``trainer`` runs under.

    Relies on ``trainer._accelerator_connector.cluster_environment``: ``trainer.strategy.cluster_environment`` is
    public but exists only on parallel strategies, and a single-device SLURM job must still see its requeue
    signal. Checked: pytorch-lightning 2.6.6.
    """
    try:
        return trainer._accelerator_connector.cluster_environment
    except AttributeError:
        raise changed("Trainer._accelerator_connector.cluster_environment", "pytorch-lightning") from None


def run_slurm_requeue(trainer: Any, signum: int) -> None:
    """Lightning's own SLURM requeue routine (HPC checkpoint on every rank, ``scontrol requeue`` on rank 0).

    Relies on ``trainer._signal_connector._slurm_sigusr_handler_fn``, the handler Lightning installs for the
    requeue signal; ``SigtermCheckpoint`` calls it at a step every rank reaches together instead of inside the
    signal handler (where its barrier can deadlock under DDP). Checked: pytorch-lightning 2.6.6.
    """
    try:
        handler = trainer._signal_connector._slurm_sigusr_handler_fn
    except AttributeError:
        raise changed("Trainer._signal_connector._slurm_sigusr_handler_fn", "pytorch-lightning") from None
    handler(signum, None)


def stop_as_on_sigterm(trainer: Any) -> None:
    """Make the ``trainer`` stop as after a SIGTERM: its loops raise ``SIGTERMException`` right after the current
    ``on_train_batch_end``.

    Relies on ``trainer._signal_connector.received_sigterm``, the flag behind the public read-only
    ``trainer.received_sigterm`` that the loops check; ``SigtermCheckpoint`` sets it on every rank at the same
    step. Checked: pytorch-lightning 2.6.6.
    """
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not hasattr(connector, "received_sigterm"):
        raise changed("Trainer._signal_connector.received_sigterm", "pytorch-lightning")
    connector.received_sigterm = True


def checkpoint_schedule(callback: Any) -> tuple[int, int]:
    """``(every_n_train_steps, every_n_epochs)`` of a ``ModelCheckpoint`` as it resolved them (0 = off).

    Relies on ``ModelCheckpoint._every_n_train_steps`` and ``._every_n_epochs``: the constructor resolves the
    defaults there (``every_n_epochs`` becomes 0 when ``every_n_train_steps`` is set) and keeps no public copy.
    Checked: pytorch-lightning 2.6.6.
    """
    try:
        return int(callback._every_n_train_steps), int(callback._every_n_epochs)
    except AttributeError:
        raise changed("ModelCheckpoint._every_n_train_steps/_every_n_epochs", "pytorch-lightning") from None


def save_last_checkpoint_only(callback: Any, trainer: Any, on_train_epoch_end: bool = False) -> bool:
    """Write ``callback``'s ``last.ckpt`` now, unless it already saved at this step or may not save now; True when
    written. ``on_train_epoch_end``: only when the callback saves at the end of training epochs (no validation).

    Lightning 2.6 defers a step-scheduled save while the monitored metric is missing (until a validation logs it,
    i.e. never without validation), and writes ``last.ckpt`` at an epoch end only after a best checkpoint; no public
    API writes ``last.ckpt`` alone. Relies on ``ModelCheckpoint._should_skip_saving_checkpoint``,
    ``._should_save_on_train_epoch_end``, ``._monitor_candidates``, ``._save_last_checkpoint`` and
    ``._last_global_step_saved``, which is put back after the save: a validation ending at this step must still
    write the (deferred) best checkpoint, which Lightning skips for a step it believes saved. Checked:
    pytorch-lightning 2.6.6.
    """
    try:
        if callback._should_skip_saving_checkpoint(trainer):
            return False
        if on_train_epoch_end and not callback._should_save_on_train_epoch_end(trainer):
            return False
        saved_step = callback._last_global_step_saved
        callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
        callback._last_global_step_saved = saved_step
    except AttributeError as error:
        raise changed(f"ModelCheckpoint.{error.name}", "pytorch-lightning") from None
    return True


def model_checkpoint_with_own_hooks(cls: type) -> type:
    """Class decorator for a ``ModelCheckpoint`` subclass: its ``find_last_checkpoints(trainer)`` and
    ``save_topk_checkpoint(trainer, monitor_candidates)`` methods replace Lightning's; they call Lightning's own
    through :func:`lightning_find_last_checkpoints` and :func:`lightning_save_topk_checkpoint`.

    Relies on ``ModelCheckpoint._find_last_checkpoints(trainer) -> set[str]``, which the checkpoint connector asks
    every ``ModelCheckpoint`` for to resolve ``ckpt_path="last"``, and ``._save_topk_checkpoint(trainer,
    monitor_candidates)``, which every scheduled save goes through. No public hook adds candidates for "last"
    (SLURM's ``hpc_ckpt_<n>.ckpt``) or lets a save fall back when the monitored metric is missing. Checked:
    pytorch-lightning 2.6.6.
    """
    import inspect

    from pytorch_lightning.callbacks import ModelCheckpoint

    for private, own, params in (("_find_last_checkpoints", "find_last_checkpoints", ["self", "trainer"]),
                                 ("_save_topk_checkpoint", "save_topk_checkpoint",
                                  ["self", "trainer", "monitor_candidates"])):
        original = getattr(ModelCheckpoint, private, None)
        if not callable(original) or list(inspect.signature(original).parameters) != params:
            raise changed(f"ModelCheckpoint.{private}({', '.join(params[1:])})", "pytorch-lightning")
        if not callable(getattr(cls, own, None)):
            raise TypeError(f"{cls.__qualname__} has no {own}() method to replace ModelCheckpoint.{private} with")
        setattr(cls, private, getattr(cls, own))
    return cls


def lightning_find_last_checkpoints(callback: Any, trainer: Any) -> set[str]:
    """Lightning's own ``ModelCheckpoint._find_last_checkpoints`` (see :func:`model_checkpoint_with_own_hooks`)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    return ModelCheckpoint._find_last_checkpoints(callback, trainer)


def lightning_save_topk_checkpoint(callback: Any, trainer: Any, monitor_candidates: dict) -> None:
    """Lightning's own ``ModelCheckpoint._save_topk_checkpoint`` (see :func:`model_checkpoint_with_own_hooks`)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    ModelCheckpoint._save_topk_checkpoint(callback, trainer, monitor_candidates)
