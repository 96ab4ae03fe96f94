"""Compare our detector with an mmdetection 3.3.0 dump (``../shared/oracle/dump_reference.py`` or
``dump_losses.py``), stage by stage, on the reference's own inputs so one difference does not cascade.

    python -m htc_lightning.tools.mmdet_parity --dump tiny_htc.pt --config configs/parity/htc_tiny.yaml
    python -m htc_lightning.tools.mmdet_parity --losses --dump loss_htc.pt --config configs/parity/htc_tiny.yaml

Prints one line per comparison and ends with ``parity: PASS`` (exit 0) or ``parity: FAIL`` (exit 1).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from ..checkpoints.mmdet import load_mmdet_checkpoint
from ..models.detector import Detector, proposals_to_detections
from ..structures import ImageMeta

ATOL = 1e-4
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6

# our loss name -> the names mmdet may give the same term (a two-stage detector prefixes ``rpn_`` to
# RPN losses whose name lacks it, e.g. GA's ``loss_anchor_loc``).
LOSS_NAMES: dict[str, tuple[str, ...]] = {
    "loss_rpn_cls": ("loss_rpn_cls",),
    "loss_rpn_bbox": ("loss_rpn_bbox",),
    "loss_anchor_loc": ("loss_anchor_loc", "rpn_loss_anchor_loc"),
    "loss_anchor_shape": ("loss_anchor_shape", "rpn_loss_anchor_shape"),
    "loss_semantic_seg": ("loss_semantic_seg",),
    **{f"s{t}.{n}": (f"s{t}.{n}",) for t in range(3) for n in ("loss_cls", "loss_bbox", "loss_mask")},
    # Mask R-CNN (one stage): mmdet names them without the stage prefix
    "loss_cls": ("loss_cls",), "loss_bbox": ("loss_bbox",), "loss_mask": ("loss_mask",),
}


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failed: bool = False

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.lines.append(f"{'ok  ' if ok else 'FAIL'} {name:38s} {detail}")
        self.failed |= not ok
        print(self.lines[-1], flush=True)


def build_detector(config: str, overrides: Sequence[str] = ()) -> Detector:
    """Our detector from a YAML file: either a bare ``Detector`` spec (``class_path``/``init_args``) or a
    full CLI config whose ``model.init_args.detector`` is one."""
    import yaml
    from jsonargparse import ArgumentParser

    with open(config) as f:
        cfg = yaml.safe_load(f)
    spec = cfg
    if "model" in cfg:
        spec = cfg["model"]["init_args"]["detector"]
    elif "detector" in cfg:
        spec = cfg["detector"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Detector, "detector")
    args = ["--detector", yaml.safe_dump(spec)]
    for kv in overrides:
        key, value = kv.split("=", 1)
        args += [f"--detector.{key}", value]
    parsed = parser.parse_args(args)
    return parser.instantiate(parsed).detector


def metas_from_dump(dump: dict) -> list[ImageMeta]:
    metas = []
    for i, m in enumerate(dump.get("img_metas") or [{}]):
        h, w = dump["inputs"].shape[-2:]
        metas.append(ImageMeta(image_id=i, orig_size=tuple(m.get("ori_shape", (h, w))[:2]),
                               img_size=tuple(m.get("img_shape", (h, w))[:2]),
                               pad_size=(h, w), scale_factor=tuple(float(s) for s in m.get("scale_factor", (1, 1))),
                               flip=False))
    return metas


def _maxdiff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _compare(rep: Report, name: str, ours: Tensor, ref: Tensor, atol: float = ATOL) -> None:
    d = _maxdiff(ours, ref)
    shape = "" if ours.shape == ref.shape else f" shapes {tuple(ours.shape)} vs {tuple(ref.shape)}"
    rep.check(name, d <= atol, f"max abs diff {d:.3g}{shape}")


def _match_boxes(ours_b: Tensor, ours_s: Tensor, ref_b: Tensor, ref_s: Tensor,
                 ours_l: Tensor | None = None, ref_l: Tensor | None = None,
                 iou_thr: float = 0.99, score_tol: float = ATOL) -> list[tuple[int, int]]:
    """One-to-one matches (ref index, our index) with the same label, IoU > thr and close scores."""
    if len(ref_b) == 0 or len(ours_b) == 0:
        return []
    iou = box_iou(ref_b.double(), ours_b.double())
    ok = (iou > iou_thr) & ((ref_s[:, None].double() - ours_s[None].double()).abs() <= score_tol)
    if ours_l is not None and ref_l is not None:
        ok &= ref_l[:, None] == ours_l[None]
    taken: set[int] = set()
    pairs = []
    for r in torch.argsort(ref_s, descending=True).tolist():
        cands = [j for j in torch.nonzero(ok[r]).flatten().tolist() if j not in taken]
        if cands:
            j = max(cands, key=lambda c: float(iou[r, c]))
            taken.add(j)
            pairs.append((r, j))
    return pairs


def compare_inference(det: Detector, dump: dict, rep: Report) -> None:
    inputs = dump["inputs"].float()
    metas = metas_from_dump(dump)
    img_sizes = [tuple(m["img_size"]) for m in metas]
    with torch.no_grad():
        feats = det.extract_feats(inputs)
        for i, (o, r) in enumerate(zip(feats, dump["fpn"])):
            _compare(rep, f"fpn P{i + 2}", o, r)
        ref_feats = [f.float() for f in dump["fpn"]]
        raw = det.rpn_head(ref_feats)
        for k, (ours_lvls, ref_lvls) in enumerate(zip(raw, dump["rpn_raw"])):
            for lvl, (o, r) in enumerate(zip(ours_lvls, ref_lvls)):
                _compare(rep, f"rpn_raw[{k}] level {lvl}", o, r)
        props = det.rpn_head.proposals(raw, img_sizes)
        if det.roi_head is None:
            # mmdet's proposal-only detector rescales its proposals to the original image
            props = [torch.cat([(d := proposals_to_detections(p, m)).boxes, d.scores[:, None]], 1)
                     for p, m in zip(props, metas)]
        for i, (p, r) in enumerate(zip(props, dump["proposals"])):
            pairs = _match_boxes(p[:, :4], p[:, 4], r[:, :4], r[:, 4])
            # ties at the cut-off may swap the last few proposals; everything else must match
            need = len(r) - max(2, len(r) // 200)
            rep.check(f"proposals image {i}", len(p) == len(r) and len(pairs) >= need,
                      f"{len(pairs)}/{len(r)} matched (ours {len(p)})")
        roi = det.roi_head
        if roi is None:
            return
        sem_feat = None
        if "semantic" in dump and getattr(roi, "semantic_head", None) is not None:
            seg_pred, sem_feat = roi.semantic(ref_feats)
            _compare(rep, "semantic seg_pred", seg_pred, dump["semantic"]["seg_pred"])
            _compare(rep, "semantic feat", sem_feat, dump["semantic"]["feat"])
            sem_feat = dump["semantic"]["feat"].float()
        for st in dump["stages"]:
            t = int(st["stage"]) if st.get("stage") is not None else 0
            cls, reg = roi.box_stage(t, ref_feats, st["rois"].float(), sem_feat)
            _compare(rep, f"stage {t} cls_score ({len(st['rois'])} rois)", cls, st["cls_score"])
            _compare(rep, f"stage {t} bbox_pred", reg, st["bbox_pred"])
        ref_props = [r.float() for r in dump["proposals"]]
        dets = roi.predict(ref_feats, ref_props, metas)[0]
        compare_detections(dets, dump["result"], rep)
        # and the whole model end to end on the input tensor
        dets_e2e = det.predict(inputs, metas)[0]
        compare_detections(dets_e2e, dump["result"], rep, prefix="end-to-end ")


def compare_detections(dets, ref: dict, rep: Report, prefix: str = "") -> None:
    rb, rs, rl = ref["bboxes"].float(), ref["scores"].float(), ref["labels"].long()
    pairs = _match_boxes(dets.boxes.float(), dets.scores.float(), rb, rs, dets.labels.long(), rl)
    rep.check(f"{prefix}detections", len(pairs) == len(rb) == len(dets),
              f"{len(pairs)}/{len(rb)} matched one to one (ours {len(dets)})")
    if "masks_packed" in ref and dets.masks is not None and pairs:
        shape = ref["masks_shape"]
        ref_masks = np.unpackbits(ref["masks_packed"].numpy(), axis=-1, count=shape[-1]).astype(bool)
        ref_masks = torch.from_numpy(ref_masks.reshape(shape))
        ious = []
        for r, j in pairs:
            a, b = ref_masks[r], dets.masks[j].bool().cpu()
            union = (a | b).sum().item()
            ious.append(1.0 if union == 0 else (a & b).sum().item() / union)
        worst = min(ious)
        rep.check(f"{prefix}masks", worst > 0.99, f"min mask IoU {worst:.4f} over {len(ious)} matched detections")


def compare_losses(det: Detector, dump: dict, rep: Report) -> None:
    det.keep_all_samples()
    det.train()
    inputs = dump["inputs"].float()
    h, w = inputs.shape[-2:]
    t = dump["targets"]
    target = {"boxes": t["boxes"].float(), "labels": t["labels"].long(), "masks": t["masks"].to(torch.uint8),
              "crowd_boxes": torch.zeros(0, 4),
              "meta": ImageMeta(image_id=0, orig_size=(h, w), img_size=(h, w), pad_size=(h, w),
                                scale_factor=(1.0, 1.0), flip=False)}
    if det.with_semantic:
        target["semantic"] = t["semantic"].long()
    torch.manual_seed(int(dump.get("seed", 0)))
    losses = det.loss(inputs, [target])
    ref = dump["losses"]
    used: set[str] = set()
    for name, value in sorted(losses.items()):
        if "loss" not in name:
            continue
        ref_name = next((n for n in LOSS_NAMES.get(name, (name,)) if n in ref), None)
        if ref_name is None:
            rep.check(f"loss {name}", False, f"ours {float(value):.6f}, no mmdet counterpart")
            continue
        used.add(ref_name)
        ours, theirs = float(value.detach()), float(ref[ref_name])
        ok = abs(ours - theirs) <= LOSS_ATOL + LOSS_RTOL * abs(theirs)
        rel = abs(ours - theirs) / max(abs(theirs), 1e-12)
        rep.check(f"loss {name}", ok, f"ours {ours:.6f} mmdet {theirs:.6f} rel diff {rel:.2e}")
    for ref_name in sorted(ref):
        if "loss" in ref_name and ref_name not in used:
            rep.check(f"loss {ref_name}", False, "mmdet has it, we do not")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", required=True, help="a .pt file from dump_reference.py or dump_losses.py")
    ap.add_argument("--config", required=True, help="our YAML (a Detector spec or a full CLI config)")
    ap.add_argument("--losses", action="store_true", help="compare training losses (a dump_losses.py file)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override detector init args, e.g. roi_head.init_args.mask_merge=last")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    dump = torch.load(args.dump, map_location="cpu", weights_only=False)
    det = build_detector(args.config, args.set)
    report = load_mmdet_checkpoint(det, dump["state_dict"], strict=False)
    rep = Report()
    rep.check("load state_dict", report.ok,
              "all keys matched" if report.ok else
              f"missing {report.missing[:5]} unexpected {report.unexpected[:5]} mismatched {report.mismatched[:5]}")
    if args.losses:
        compare_losses(det, dump, rep)
    else:
        det.eval()
        compare_inference(det, dump, rep)
    print(f"parity: {'FAIL' if rep.failed else 'PASS'}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
