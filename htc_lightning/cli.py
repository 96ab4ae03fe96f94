"""``htc-lightning`` command line: ``fit``, ``validate``, ``test``, ``predict`` from YAML configs.

Every part is chosen by ``class_path`` (detector, backbone, heads, datamodule). The datamodule's
``num_classes`` is linked into the detector, which hands it to its parts, so a config names the dataset once::

    htc-lightning fit --config configs/htc/htc_r50_fpn_1x_coco.yaml
    htc-lightning fit --config ... --ckpt_path last          # resume (also after SIGTERM)
    htc-lightning predict --config ... --ckpt_path best.ckpt --data.init_args.predict_images imgs/ \
        --prediction_writer.output_dir out/ --prediction_writer.draw true
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ._lightning_compat import apply_ckpt_hparams_with_own_method
from .callbacks import (
    AtomicCheckpointIO,
    CocoPredictionWriter,
    DetectionCheckpoint,
    OptionalLearningRateMonitor,
    ResumeState,
    SigtermCheckpoint,
)
from .callbacks.faults import SIGTERM_EXIT_CODE
from .checkpoints.upgrade import detector_config
from .models.backbones.timm_backbone import PretrainedWeightsError
from .module import DetectionModule

DETECTOR_NUM_CLASSES = "model.init_args.detector.init_args.num_classes"


def _num_classes(datamodule: Any) -> int:
    return int(datamodule.num_classes)


@apply_ckpt_hparams_with_own_method
class HTCLightningCLI(LightningCLI):
    """LightningCLI with the project's defaults.

    - model: any ``DetectionModule`` subclass by ``class_path`` (default ``DetectionModule``); data: any
      ``LightningDataModule`` by ``class_path`` (``htc_lightning.data.datamodule.CocoDataModule`` for COCO).
    - ``data.num_classes`` -> ``model...detector.init_args.num_classes`` at instantiation.
    - Callbacks always present and configurable under their own keys: ``checkpoint``
      (``last.ckpt`` + best by ``val/segm_mAP``), ``lr_monitor``, ``sigterm`` (checkpoint on SIGTERM),
      ``resume`` (mid-epoch sampler position and RNGs), ``prediction_writer`` (COCO json of ``predict``).
    - Checkpoints are written atomically (:class:`AtomicCheckpointIO`) unless a plugin sets another IO.

    Usable from Python: ``HTCLightningCLI(args=[...], run=False)`` returns with ``.model``, ``.datamodule``
    and ``.trainer`` built.
    """

    def __init__(self, model_class: type | None = DetectionModule, datamodule_class: type | None = None,
                 *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(model_class, datamodule_class or pl.LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(DetectionCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/segm_mAP", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.save_top_k": 1,
                             "checkpoint.filename": "best-epoch{epoch:02d}-step{step}",
                             "checkpoint.auto_insert_metric_name": False,
                             # a resumed run overwrites last.ckpt instead of piling up last-v1, last-v2 ...
                             "checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(OptionalLearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(SigtermCheckpoint, "sigterm")
        parser.add_lightning_class_args(ResumeState, "resume")
        parser.add_lightning_class_args(CocoPredictionWriter, "prediction_writer")
        # CocoDataModule's GroupedBatchSampler shards by rank itself and must not be replaced by Lightning.
        parser.set_defaults({"trainer.use_distributed_sampler": False})
        parser.link_arguments("data", DETECTOR_NUM_CLASSES, compute_fn=_num_classes, apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        if args is None or isinstance(args, (list, tuple)):
            given = sys.argv[1:] if args is None else list(args)
            rewritten = nested_nulls_as_objects(given)
            if rewritten != given:
                if args is None:  # Lightning's own parse_arguments would warn about args given with sys.argv
                    self.config = parser.parse_args(rewritten)
                    return
                args = rewritten
        super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        # jsonargparse reports a constructor's error as one alternative of a 25-line union message that ends in
        # a dump of the whole config; the offline-weights error is raised on its own, first line first.
        PretrainedWeightsError.last = None
        try:
            super().instantiate_classes()
        except Exception as e:
            error = PretrainedWeightsError.last
            if error is None or error is e:
                raise
            raise error from None

    def apply_ckpt_hparams(self) -> None:
        """``test/predict --ckpt_path FILE``: take only the architecture (the detector) and the categories from the
        checkpoint. Lightning's default applies all of them over the config, which would silently undo
        evaluation settings given in the config or on the command line (``outfile_prefix``, ``backend``, ...).
        ``fit --ckpt_path`` keeps the configured detector: a resumed run trains what its config says (and its
        config.yaml records it); ``DetectionModule.on_load_checkpoint`` reports what differs from the checkpoint,
        or fails naming the keys when the weights do not fit.
        Lightning calls it right after parsing, in place of its own (``_lightning_compat`` routes it)."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
        hparams = checkpoint.get("hyper_parameters", {})
        update: dict[str, Any] = {}
        detector = detector_config(hparams)
        if detector is not None and self.config.subcommand != "fit":
            # the whole model entry as parsed, with the checkpoint's detector: parsing a partial entry would reset
            # the other init_args to their defaults
            model = self.config[self.config.subcommand]["model"].as_dict()
            model.setdefault("init_args", {})["detector"] = detector
            update["model"] = model
        data = self.config[self.config.subcommand].get("data")
        if checkpoint.get("categories") and data is not None:
            # the checkpoint's label table: predict needs no annotation file, test checks the file's against it
            data = data.as_dict()
            init_args = data.setdefault("init_args", {})
            if "categories" in init_args and init_args["categories"] is None:
                init_args["categories"] = checkpoint["categories"]
                update["data"] = data
        if update:
            self.config = self.parser.parse_object({self.config.subcommand: update}, self.config)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            # fixed before fit(ckpt_path="last") looks for last.ckpt, which happens before callback setup
            if isinstance(callback, DetectionCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.join(str(trainer.default_root_dir), "checkpoints")
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def set_module_resume_ckpt(self) -> None:
        """``load_from`` runs in the module's setup, before Lightning restores ``ckpt_path``: tell it whether a
        checkpoint will be restored ("last" only when one exists), so that a resumed run skips load_from."""
        if hasattr(self.model, "resume_ckpt_path"):
            self.model.resume_ckpt_path = self._restored_ckpt(self.config_init[self.subcommand].get("ckpt_path"))

    # LightningCLI's public ``before_<subcommand>`` hooks, called once the trainer exists and before the run
    before_fit = before_validate = before_test = before_predict = set_module_resume_ckpt

    def _restored_ckpt(self, ckpt_path: str | None) -> str | None:
        if ckpt_path != "last":
            return ckpt_path
        for callback in self.trainer.checkpoint_callbacks:
            last = Path(str(callback.dirpath or "")) / "last.ckpt"
            if callback.dirpath and last.is_file():
                return str(last)
        return None


_NULLS = ("null", "none", "~")


def nested_nulls_as_objects(args: list[str]) -> list[str]:
    """``--a.init_args.b.init_args.c null`` -> ``--a '{"init_args": {"b": {"init_args": {"c": null}}}}'``.

    jsonargparse (checked 4.53.0) hands a value two or more subclass levels down as the text ``f"--{key}={value}"``,
    so a null becomes the string ``"None"``, which no ``X | None`` argument accepts (``semantic_head null`` failed
    with a 25-line union error). The same override given as a partial object of the first key is merged with the
    config's value by jsonargparse and keeps the null. Other values are left as they are.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, value, width = None, None, 1
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif arg.startswith("--") and i + 1 < len(args):
            key, value, width = arg[2:], args[i + 1], 2
        if key is not None and value.strip().lower() in _NULLS and key.split(".").count("init_args") >= 2:
            root, *path = key.split(".")
            nested: Any = None
            for part in reversed(path):
                nested = {part: nested}
            out += [f"--{root}", json.dumps(nested)]
        else:
            out += args[i:i + width]
        i += width
    return out


def main(args: list[str] | None = None) -> None:
    """The ``htc-lightning`` console script (also ``python cli.py``).

    A preempted run (SIGTERM, checkpoint written) exits with status 143, the shell's "terminated by SIGTERM",
    so a scheduler or wrapper script does not mistake it for a finished training. ``export`` is not a Lightning
    subcommand: it goes to ``htc_lightning.export.main`` before LightningCLI parses anything."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        from .export import main as export_main

        export_main(argv[1:])
        return
    try:
        HTCLightningCLI(args=args)
    except SIGTERMException:
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    except PretrainedWeightsError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
