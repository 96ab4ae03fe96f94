"""End to end with the real parts: a tiny HTC (ResNet-18, FPN, RPN, HTC heads with the semantic branch) on
synthetic COCO through the CLI: fit, resume from ``last``, test, predict with drawn output, exact resume."""
from __future__ import annotations

import json
import os

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import SigtermAt

from htc_lightning.cli import HTCLightningCLI


def tiny_htc_config(tmp_path, coco_root, **trainer) -> str:
    parts = "htc_lightning.models"
    head = {"interleaved": True, "mask_info_flow": True,
            "bbox_head": {"class_path": f"{parts}.roi_heads.bbox_head.Shared2FCBBoxHead",
                          "init_args": {"fc_out_channels": 64}},
            "mask_head": {"class_path": f"{parts}.roi_heads.mask_head.FCNMaskHead",
                          "init_args": {"conv_channels": 32, "num_convs": 1}},
            "sampler": {"class_path": f"{parts}.layers.samplers.RandomSampler",
                        "init_args": {"num": 64, "pos_fraction": 0.25}},
            "semantic_head": {"class_path": "htc_lightning.models.roi_heads.semantic_head.FusedSemanticHead",
                              "init_args": {"conv_out_channels": 32, "num_convs": 1}}}
    detector = {"class_path": "htc_lightning.models.detector.Detector", "init_args": {
        "backbone": {"class_path": "htc_lightning.models.backbones.timm_backbone.TimmBackbone",
                     "init_args": {"model_name": "resnet18", "frozen_stages": -1, "norm_eval": False}},
        "neck": {"class_path": "htc_lightning.models.necks.fpn.FPN", "init_args": {"out_channels": 32}},
        "rpn_head": {"class_path": "htc_lightning.models.proposals.rpn.RPN",
                     "init_args": {"feat_channels": 32, "train_nms_pre": 200,
                                   "train_max_per_img": 100, "test_nms_pre": 200, "test_max_per_img": 50}},
        "roi_head": {"class_path": "htc_lightning.models.roi_heads.cascade.CascadeRoIHead", "init_args": head}}}
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "val_check_interval": 2, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
                    "default_root_dir": str(tmp_path / "run"), **trainer},
        "model": {"class_path": "htc_lightning.module.DetectionModule",
                  "init_args": {"lr": 0.01, "warmup_iters": 2, "log_images": 0, "detector": detector}},
        "data": {"class_path": "htc_lightning.data.datamodule.CocoDataModule",
                 "init_args": {"data_root": str(coco_root), "stuff_maps": "stuffthingmaps",
                               "train_scales": [[64, 64]], "test_scale": [64, 64], "batch_size": 2,
                               "num_workers": 0, "predict_images": "val2017"}},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny_htc.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_real_htc_fit_resume_test_and_predict(tmp_path, coco_root):
    config = tiny_htc_config(tmp_path, coco_root)
    fitted = HTCLightningCLI(args=["fit", "--config", config])
    roi_head = fitted.model.detector.roi_head
    assert roi_head.num_classes == fitted.datamodule.num_classes  # linked, not the default 80
    assert {"val/bbox_mAP", "val/segm_mAP"} <= set(fitted.trainer.callback_metrics)
    # the semantic branch trains: its loss is logged under its own name, finite and positive
    semantic_loss = fitted.trainer.logged_metrics["train/loss_semantic_seg"]
    assert torch.isfinite(semantic_loss) and float(semantic_loss) > 0
    resumed = HTCLightningCLI(args=["fit", "--config", config, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 3
    last = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    prefix = str(tmp_path / "results")
    tested = HTCLightningCLI(args=["test", "--config", config, "--ckpt_path", last,
                                   "--model.init_args.outfile_prefix", prefix])
    metrics = tested.trainer.callback_metrics
    # the logged AP is what pycocotools computes on the COCO json the run wrote
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(tested.datamodule.test_ann_file)
    for iou_type in ("bbox", "segm"):
        written = sorted(tmp_path.glob(f"results*{iou_type}.json"))
        assert written, list(tmp_path.iterdir())
        ev = COCOeval(gt, gt.loadRes(str(written[0])), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert float(metrics[f"test/{iou_type}_mAP"]) == pytest.approx(ev.stats[0], abs=1e-6)
    out = tmp_path / "pred"
    HTCLightningCLI(args=["predict", "--config", config, "--ckpt_path", last, "--prediction_writer.output_dir",
                          str(out), "--prediction_writer.draw", "true", "--prediction_writer.score_thr", "0.0"])
    results = json.loads((out / "predictions.bbox.json").read_text())
    cat_ids = set(fitted.datamodule.cat_ids)
    assert all(r["category_id"] in cat_ids for r in results)
    assert len(list((out / "vis").glob("*.png"))) == 2


@pytest.mark.slow
def test_real_htc_resume_after_sigterm_is_exact(tmp_path, coco_root):
    # batch size 1, 4 batches per epoch: stop after step 2 (mid-epoch), resume to step 3. Random flips, RoI
    # sampling and the semantic branch are all on, so the data's per-sample seeding and the RNG restore count.
    args = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "1.0",
            "--data.init_args.batch_size", "1"]
    full = HTCLightningCLI(args=["--config", tiny_htc_config(tmp_path / "a", coco_root), *args], run=False)
    full.trainer.fit(full.model, full.datamodule)
    cut_cfg = tiny_htc_config(tmp_path / "b", coco_root)
    cut = HTCLightningCLI(args=["--config", cut_cfg, *args], run=False)
    cut.trainer.callbacks.append(SigtermAt(2))
    with pytest.raises(SystemExit):
        cut.trainer.fit(cut.model, cut.datamodule)
    pl.seed_everything(7)
    again = HTCLightningCLI(args=["--config", cut_cfg, *args, "--seed_everything", "7"], run=False)
    again.trainer.fit(again.model, again.datamodule, ckpt_path="last")
    assert again.trainer.global_step == 3
    expected, got = full.model.state_dict(), again.model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_proposal_only_detector_builds_without_the_num_classes_link(tmp_path, coco_root):
    config = yaml.safe_load(open(tiny_htc_config(tmp_path, coco_root)))
    config["model"]["init_args"]["detector"]["init_args"]["roi_head"] = None  # e.g. GA-RPN alone
    path = tmp_path / "rpn_only.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = HTCLightningCLI(args=["--config", str(path)], run=False)
    assert cli.model.detector.roi_head is None
    assert cli.model.default_iou_types() == ("proposal",)


def test_real_htc_trains_in_bf16_mixed_precision_on_cpu(tmp_path, coco_root):
    cli = HTCLightningCLI(args=["fit", "--config", tiny_htc_config(tmp_path, coco_root), "--trainer.precision",
                                "bf16-mixed", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.logged_metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


def test_real_htc_trains_with_the_opt_in_vectorised_cpu_roi_align_from_a_callback_flag(tmp_path, coco_root):
    from htc_lightning.accel.roi_align_cpu import roi_align
    from htc_lightning.models.layers.roi_extractor import MultiLevelRoIAlign

    cli = HTCLightningCLI(args=["fit", "--config", tiny_htc_config(tmp_path, coco_root), "--trainer.callbacks+="
                                "htc_lightning.accel.roi_align_cpu.VectorisedCPURoIAlign", "--trainer.max_steps", "1",
                                "--trainer.limit_val_batches", "0"])
    extractors = [m for m in cli.model.modules() if isinstance(m, MultiLevelRoIAlign)]
    assert len(extractors) == 3 and all(e.kernel is roi_align for e in extractors)  # box, mask and semantic
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.logged_metrics["train/loss"])


@pytest.mark.slow
def test_real_htc_trains_with_two_ddp_processes_via_the_cli(tmp_path, coco_root):
    # the `ddp` strategy relaunches the command itself, as on a cluster: run the CLI as a subprocess
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "cli.py"), "fit", "--config", tiny_htc_config(tmp_path, coco_root),
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "2",
           "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2", "--data.init_args.batch_size", "1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2


def test_semantic_config_without_stuff_maps_fails_at_setup_naming_the_config_to_use(coco_root, tmp_path):
    from htc_lightning.cli import main

    cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo",
                       "htc_tiny_synthetic.yaml")
    with pytest.raises(ValueError, match="htc-without-semantic_r50_fpn_1x_coco.yaml"):
        main(["fit", "--config", cfg, "--data.init_args.data_root", str(coco_root),
              "--data.init_args.stuff_maps", "null", "--data.init_args.num_workers", "0",
              "--trainer.max_steps", "1", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path)])
