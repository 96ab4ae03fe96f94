"""Write the model configs of configs/ from one description, so that the dozens of YAML files share
one truth (mmdetection's settings) instead of drifting copies. Run after changing it:

    python configs/generate.py

Each YAML is a complete LightningCLI config (``htc-lightning fit --config FILE``); the number of classes
is linked from the data module into the Detector, which gives it and every input width to the parts
(models/interfaces.py FeatureSpec), so neither is repeated.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PKG = "htc_lightning"


def backbone(model_name: str = "resnet50", frozen_stages: int = 1, norm_eval: bool = True, dcn_stages=(),
             **model_kwargs) -> dict:
    # ImageNet weights from timm (fetched at run time), as mmdet's init_cfg=Pretrained; a local file can be
    # given instead with ``weights: PATH``
    args = {"model_name": model_name, "pretrained": True, "frozen_stages": frozen_stages, "norm_eval": norm_eval}
    if dcn_stages:
        args["dcn_stages"] = list(dcn_stages)
    if model_kwargs:
        args["model_kwargs"] = model_kwargs
    return {"class_path": f"{PKG}.models.backbones.TimmBackbone", "init_args": args}


def fishnet(depth: int, **kw) -> dict:
    # the authors' ImageNet checkpoints (no public download URL): pass ``weights: PATH`` to start from them
    return {"class_path": f"{PKG}.models.backbones.FishNet", "init_args": {"depth": depth, **kw}}


FPN = {"class_path": f"{PKG}.models.necks.fpn.FPN", "init_args": {"out_channels": 256, "num_outs": 5}}
RPN = {"class_path": f"{PKG}.models.proposals.rpn.RPN", "init_args": {}}
# GA-RPN proposals for a two-stage detector (mmdet's ga-*-rcnn configs): 2000/1000/300 in training,
# 1000/1000/300 at test; GA needs gradient clipping (max norm 35, set in the trainer below). The location
# branch trains with the paper's targets (centres positive); mmdet >= 2.0 inverts them (docs/ga_location_targets.md).
GA_RPN = {"class_path": f"{PKG}.models.proposals.ga_rpn.GARPN",
          "init_args": {"invert_loc_targets": False, "train_nms_pre": 2000, "train_nms_post": 1000,
                        "train_max_per_img": 300, "test_nms_pre": 1000, "test_nms_post": 1000, "test_max_per_img": 300}}
SEMANTIC = {"class_path": f"{PKG}.models.roi_heads.semantic_head.FusedSemanticHead",
            "init_args": {"num_classes": 183}}


def part(module: str, cls: str, **init_args) -> dict:
    return {"class_path": f"{PKG}.{module}.{cls}", "init_args": init_args}


def roi_head(kind: str = "htc", **extra) -> dict:
    args: dict = {}
    if kind in ("htc", "htc-without-semantic"):
        args.update(interleaved=True, mask_info_flow=True, score_thr=0.001, mask_merge="mean")
        if kind == "htc":
            args["semantic_head"] = copy.deepcopy(SEMANTIC)
    elif kind == "cascade":
        args.update(interleaved=False, mask_info_flow=False, score_thr=0.05, mask_merge="mean",
                    assigner=part("models.layers.assigners", "MaxIoUAssigner", match_low_quality=False))
    elif kind == "mask_rcnn":
        args.update(num_stages=1, stage_loss_weights=[1.0], iou_thresholds=[0.5], target_stds=[[0.1, 0.1, 0.2, 0.2]],
                    interleaved=False, mask_info_flow=False, score_thr=0.05,
                    bbox_head=part("models.roi_heads.bbox_head", "Shared2FCBBoxHead", reg_class_agnostic=False,
                                   bbox_loss="l1"))
    else:
        raise ValueError(kind)
    args.update(extra)
    return {"class_path": f"{PKG}.models.roi_heads.cascade.CascadeRoIHead", "init_args": args}


def config(comment: str, bb: dict, rpn: dict, roi: dict | None, *, epochs: int = 12, steps=(8, 11),
           semantic: bool = False, name: str, clip: float | None = None, data_extra: dict | None = None,
           batch_size: int = 2, module_extra: dict | None = None) -> tuple[str, dict]:
    det = {"class_path": f"{PKG}.models.detector.Detector",
           "init_args": {"backbone": bb, "neck": copy.deepcopy(FPN), "rpn_head": copy.deepcopy(rpn)}}
    if roi is not None:
        det["init_args"]["roi_head"] = roi
    data = {"data_root": "data/coco", "batch_size": batch_size, "num_workers": 4}
    if semantic:
        data["stuff_maps"] = "stuffthingmaps"
    data.update(data_extra or {})
    cfg = {
        "seed_everything": 0,
        "trainer": {"max_epochs": epochs, "precision": "32-true", "default_root_dir": f"outputs/{name}",
                    "gradient_clip_val": clip, "log_every_n_steps": 50},
        "model": {"class_path": f"{PKG}.module.DetectionModule",
                  "init_args": {"lr": 0.02, "base_batch_size": 16, "max_epochs_schedule": list(steps),
                                **(module_extra or {}), "detector": det}},
        "data": {"class_path": f"{PKG}.data.datamodule.CocoDataModule", "init_args": data},
    }
    return comment, cfg


ENTRY_MS = {"train_short_range": [400, 1400], "train_max_long": 1600}
DCN_C3_C5 = (2, 3, 4)


def configs() -> dict[str, tuple[str, dict]]:
    out: dict[str, tuple[str, dict]] = {}
    r50 = backbone()
    out["htc/htc_r50_fpn_1x_coco"] = config(
        "HTC R-50-FPN 1x (mmdet htc_r50_fpn_1x_coco.py). Model zoo, COCO val2017: 42.3 box / 37.4 mask AP.",
        r50, RPN, roi_head("htc"), semantic=True, name="htc_r50_fpn_1x_coco")
    out["htc/htc_r50_fpn_20e_coco"] = config(
        "HTC R-50-FPN 20e (mmdet htc_r50_fpn_20e_coco.py): 43.3 box / 38.3 mask AP.",
        r50, RPN, roi_head("htc"), semantic=True, epochs=20, steps=(16, 19), name="htc_r50_fpn_20e_coco")
    out["htc/htc-without-semantic_r50_fpn_1x_coco"] = config(
        "HTC without the semantic branch (for data without COCO-Stuff maps).",
        r50, RPN, roi_head("htc-without-semantic"), name="htc-without-semantic_r50_fpn_1x_coco")
    out["htc/htc_ga-rpn_r50_fpn_1x_coco"] = config(
        "HTC R-50 with Guided Anchoring proposals (the 2018 entry's proposal generator).",
        r50, GA_RPN, roi_head("htc"), semantic=True, clip=35.0, name="htc_ga-rpn_r50_fpn_1x_coco")
    out["htc/htc_r101_fpn_20e_coco"] = config(
        "HTC R-101-FPN 20e: 44.8 box / 39.6 mask AP (model zoo).",
        backbone("resnet101"), RPN, roi_head("htc"), semantic=True, epochs=20, steps=(16, 19),
        name="htc_r101_fpn_20e_coco")
    out["htc/htc_x101-64x4d_fpn_16xb1-20e_coco"] = config(
        "HTC X-101-64x4d-FPN 20e, 1 image per GPU on 16 GPUs: 47.0 box / 41.4 mask AP (model zoo).",
        backbone("resnext101_64x4d"), RPN, roi_head("htc"), semantic=True, epochs=20, steps=(16, 19),
        batch_size=1, name="htc_x101-64x4d_fpn_16xb1-20e_coco")
    out["htc/htc_x101-64x4d-dconv-c3-c5_fpn_ms-400-1400-16xb1-20e_coco"] = config(
        "mmdet's best single HTC: X-101-64x4d with DCN in c3-c5, multi-scale training (short edge 400-1400, long "
        "edge <= 1600), 20e: 50.4 box / 43.8 mask AP (model zoo). Train with SyncBN off (frozen BN).",
        backbone("resnext101_64x4d", dcn_stages=DCN_C3_C5), RPN, roi_head("htc"), semantic=True, epochs=20,
        steps=(16, 19), batch_size=1, data_extra=ENTRY_MS,
        name="htc_x101-64x4d-dconv-c3-c5_fpn_ms-400-1400-16xb1-20e_coco")
    # the paper's ablation ladder (Table 2): each adds one component
    ladder = [("1_cascade", roi_head("cascade"), False, "Cascade Mask R-CNN baseline (paper: 42.5 box / 36.5 mask)"),
              ("2_interleaved", roi_head("htc-without-semantic", mask_info_flow=False), False,
               "+ interleaved execution (paper: 36.7 mask)"),
              ("3_mask_info_flow", roi_head("htc-without-semantic"), False, "+ mask information flow (paper: 37.4)"),
              ("4_semantic", roi_head("htc"), True, "+ semantic branch = full HTC (paper: 43.2 box / 38.2 mask)")]
    for step, roi, sem, text in ladder:
        out[f"htc/ablation/{step}_r50_fpn_1x_coco"] = config(
            f"HTC ablation ladder, step {step}: {text}.", r50, RPN, roi, semantic=sem, name=f"htc_ablation_{step}")
    out["cascade/cascade-mask-rcnn_r50_fpn_1x_coco"] = config(
        "Cascade Mask R-CNN R-50-FPN 1x (mmdet cascade-mask-rcnn_r50_fpn_1x_coco.py), the seed's baseline.",
        r50, RPN, roi_head("cascade"), name="cascade-mask-rcnn_r50_fpn_1x_coco")
    out["mask_rcnn/mask_rcnn_r50_fpn_1x_coco"] = config(
        "Mask R-CNN R-50-FPN 1x (mmdet mask-rcnn_r50_fpn_1x_coco.py): the baseline of the FishNet table "
        "(ResNet-50: 38.6 box / 34.5 mask AP in the seed's report).",
        r50, {"class_path": RPN["class_path"],
              "init_args": {"allowed_border": -1, "bbox_loss": "l1", "train_max_per_img": 1000}},
        roi_head("mask_rcnn"), name="mask_rcnn_r50_fpn_1x_coco")
    out["ga_rpn/ga-rpn_r50_fpn_1x_coco"] = config(
        "GA-RPN R-50-FPN alone, evaluated by proposal AR@100/300/1000 (mmdet ga-rpn_r50_fpn_1x_coco.py; model zoo "
        "R-50-caffe AR@1000 68.4).",
        r50, {"class_path": GA_RPN["class_path"],
              "init_args": {"invert_loc_targets": False, "test_nms_pre": 2000, "test_nms_post": 1000,
                            "test_max_per_img": 1000}},
        None, clip=35.0, name="ga-rpn_r50_fpn_1x_coco")
    out["ga_rpn/rpn_r50_fpn_1x_coco"] = config(
        "Plain RPN R-50-FPN alone, the GA-RPN comparison (proposal AR).", r50,
        {"class_path": RPN["class_path"], "init_args": {"allowed_border": -1, "bbox_loss": "l1"}}, None,
        name="rpn_r50_fpn_1x_coco")
    # FishNet: the body's end and the head's three stages feed the FPN (see FishNet's docstring)
    for depth in (99, 150):
        out[f"fishnet/htc_fishnet{depth}_fpn_1x_coco"] = config(
            f"HTC with a FishNet-{depth} backbone.", fishnet(depth), RPN, roi_head("htc"), semantic=True,
            name=f"htc_fishnet{depth}_fpn_1x_coco")
    out["fishnet/cascade_mask_fishnet99_fpn_1x_coco"] = config(
        "Cascade Mask R-CNN with FishNet-99, the seed's Mask R-CNN-family FishNet comparison.",
        fishnet(99), RPN, roi_head("cascade"), name="cascade_mask_fishnet99_fpn_1x_coco")
    out["fishnet/mask_rcnn_fishnet99_fpn_1x_coco"] = config(
        "Mask R-CNN with FishNet-99 (the seed reports FishNet-188: 41.5 box / 37.0 mask vs ResNet-50 38.6 / 34.5).",
        fishnet(99), {"class_path": RPN["class_path"],
                      "init_args": {"allowed_border": -1, "bbox_loss": "l1", "train_max_per_img": 1000}},
        roi_head("mask_rcnn"), name="mask_rcnn_fishnet99_fpn_1x_coco")
    # the entry's ensemble backbones, each under HTC + GA-RPN + DCN + multi-scale training (2018 recipe)
    for name, bb in [("x101-64x4d", backbone("resnext101_64x4d", dcn_stages=DCN_C3_C5)),
                     ("x101-32x8d", backbone("resnext101_32x8d", dcn_stages=DCN_C3_C5)),
                     ("senet154", backbone("legacy_senet154")),
                     ("dpn107", backbone("dpn107")),
                     ("fishnet150", fishnet(150))]:
        out[f"entry2018/htc_ga-rpn_{name}_fpn_ms-400-1400-20e_coco"] = config(
            f"The 2018 entry's recipe with a {name} backbone: HTC + GA-RPN"
            f"{' + DCN (c3-c5)' if 'x101' in name else ''} + multi-scale training (short 400-1400, long <= 1600) "
            "+ multi-scale & flip testing + Soft-NMS (test with --model.init_args.tta ...; see tta.py).",
            bb, GA_RPN, roi_head("htc", nms_type="soft_nms_linear"), semantic=True, epochs=20, steps=(16, 19),
            batch_size=1, clip=35.0, data_extra=ENTRY_MS, name=f"entry2018_{name}")
    return out


def render(comment: str, cfg: dict) -> str:
    text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=110)
    return f"# {comment}\n# Generated by configs/generate.py; edit that file, not this one.\n{text}"


def main() -> None:
    for rel, (comment, cfg) in configs().items():
        path = HERE / f"{rel}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(comment, cfg))
        print(path.relative_to(HERE.parent))


if __name__ == "__main__":
    main()
