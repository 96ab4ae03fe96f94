"""Compare our detector with an mmdetection 3.3.0 dump (``../shared/oracle/dump_reference.py`` or
``dump_losses.py``), stage by stage, on the reference's own inputs so one difference does not cascade.

    python -m htc_lightning.tools.mmdet_parity --dump tiny_htc.pt --config configs/parity/htc_tiny.yaml
    python -m htc_lightning.tools.mmdet_parity --losses --dump loss_htc.pt --config configs/parity/htc_tiny.yaml

Prints one line per comparison (float differences also as a fraction of the reference tensor's scale,
decisions with their near-ties; see ``compare.py`` for the tolerances and why), a ``summary:`` line with the
largest normalised difference and the near-ties accepted, and ends with ``parity: PASS`` (exit 0) or
``parity: FAIL`` (exit 1). ``--device cuda`` runs the same comparisons on a GPU.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..checkpoints.mmdet import load_mmdet_checkpoint
from ..models.detector import Detector, proposals_to_detections
from ..models.interfaces import ProposalGenerator, ProposalSettings
from ..structures import ImageMeta
from .compare import SCORE_TOL, Diff, compare_kept_sets, diff, mask_iou, score_tolerance, threshold_flips

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


# the oracle's dump name (``tiny_<family>[_<image>]_s<seed>``, ``loss_<family>_s<seed>[_n<objects>]``) -> our
# config of that family in configs/parity/
FAMILY_CONFIG = {
    "cascade": "cascade_mask_rcnn_tiny.yaml",
    "htc": "htc_tiny.yaml",
    "htc_nosem": "htc_without_semantic_tiny.yaml",
    "ga_rpn": "ga_rpn_tiny.yaml",
    "htc_ga": "htc_ga_rpn_tiny.yaml",
    "mask_rcnn": "mask_rcnn_tiny.yaml",
}


def family_of(stem: str) -> str:
    """The family of an oracle dump's file stem: the longest family name its name (less tiny_/loss_) starts with."""
    name = stem.split("_", 1)[1]
    found = [f for f in FAMILY_CONFIG if name == f or name.startswith(f + "_")]
    if not found:
        raise ValueError(f"dump {stem!r}: no family of {sorted(FAMILY_CONFIG)} in its name")
    return max(found, key=len)


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failed: bool = False
    worst: tuple[float, str] = (0.0, "")  # the largest normalised float difference and where
    near_ties: int = 0

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.lines.append(f"{'ok  ' if ok else 'FAIL'} {name:38s} {detail}")
        self.failed |= not ok
        print(self.lines[-1], flush=True)

    def floats(self, name: str, d: Diff, extra: str = "") -> None:
        if d.same_shape and d.normalised > self.worst[0]:
            self.worst = (d.normalised, name)
        self.check(name, d.ok, f"{d}{extra}")

    def summary(self) -> str:
        return (f"summary: largest normalised difference {self.worst[0]:.1e}"
                f"{f' ({self.worst[1]})' if self.worst[1] else ''}, near-ties accepted {self.near_ties}")


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


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def compare_raw(rep: Report, head: torch.nn.Module, raw, ref_raw, ref_config: str = "") -> None:
    """Raw proposal-head outputs per level. At test time mmdet's GA-RPN zeroes its cls/reg maps where
    ``sigmoid(loc)`` is below ``loc_filter_thr`` (its MaskedConv2d; ours reads only the kept locations, so ours
    are zeroed alike here): those maps are compared where both sides took the same decision, and every flipped
    location must be a near-tie (the reference's loc logit within float tolerance of its threshold's logit)."""
    thr = getattr(head, "loc_filter_thr", None)
    agree = None
    if thr is not None and len(raw) == len(ref_raw) == 4:
        found = re.search(r"loc_filter_thr=([0-9.eE+-]+)", ref_config)
        ref_thr = float(found.group(1)) if found else thr
        agree = []
        for lvl, (o, r) in enumerate(zip(raw[3], ref_raw[3])):
            ok_pos, flips = threshold_flips(o, r, _logit(thr), _logit(ref_thr))
            agree.append(ok_pos)
            rep.near_ties += flips.near_ties
            rep.check(f"loc filter level {lvl}", flips.ok, str(flips))
    for k, (ours_lvls, ref_lvls) in enumerate(zip(raw, ref_raw)):
        for lvl, (o, r) in enumerate(zip(ours_lvls, ref_lvls)):
            masked = agree is not None and k in (0, 1)
            if masked:
                o = o * head.location_mask(raw[3][lvl], location_filter=True).to(o.dtype)
            where = agree[lvl].expand_as(r) if masked and o.shape == r.shape else None
            rep.floats(f"rpn_raw[{k}] level {lvl}", diff(o, r, where=where),
                       " where both filter alike" if where is not None and not bool(where.all()) else "")


def compare_proposals(rep: Report, head: ProposalGenerator, props: list[Tensor], ref: list[Tensor],
                      ref_cls_logits: list[Tensor] | None = None, prefix: str = "",
                      settings: ProposalSettings | None = None) -> None:
    """Proposal sets as sets (ties may reorder), tie-aware for the head's NMS and its per-image cut (of
    ``settings``, default the test settings); scores agree within what float rounding of the reference's
    objectness logits allows."""
    max_per_img = (settings or head.test_settings).max_per_img
    score_tol = SCORE_TOL if not ref_cls_logits else score_tolerance(
        max(float(t.abs().max()) for t in ref_cls_logits if t.numel()), slope=0.25)
    for i, (p, r) in enumerate(zip(props, ref)):
        cmp = compare_kept_sets(r[:, :4], r[:, 4], p[:, :4].cpu(), p[:, 4].cpu(), nms_iou=head.nms_iou,
                                top_k=max_per_img, score_tol=score_tol)
        rep.near_ties += cmp.near_ties
        rep.check(f"{prefix}proposals image {i}", cmp.ok, str(cmp))


def compare_inference(det: Detector, dump: dict, rep: Report, device: str = "cpu") -> None:
    inputs = dump["inputs"].float().to(device)
    metas = metas_from_dump(dump)
    img_sizes = [tuple(m["img_size"]) for m in metas]
    with torch.no_grad():
        feats = det.extract_feats(inputs)
        for i, (o, r) in enumerate(zip(feats, dump["fpn"])):
            rep.floats(f"fpn P{i + 2}", diff(o, r))
        ref_feats = [f.float().to(device) for f in dump["fpn"]]
        raw = det.rpn_head(ref_feats)
        compare_raw(rep, det.rpn_head, raw, dump["rpn_raw"], dump.get("config", ""))
        # proposals from the reference's raw outputs, so that a near-tie of the location filter (compared
        # above) does not cascade into the proposal sets
        ref_raw = tuple([t.float().to(device) for t in lvls] for lvls in dump["rpn_raw"])
        props = det.rpn_head.proposals(ref_raw, img_sizes, det.rpn_head.test_settings)
        ref_props = [r.float() for r in dump["proposals"]]
        if det.roi_head is None:
            # mmdet's proposal-only detector rescales its proposals to the original image
            props = [torch.cat([(d := proposals_to_detections(p, m)).boxes, d.scores[:, None]], 1)
                     for p, m in zip(props, metas)]
        compare_proposals(rep, det.rpn_head, props, ref_props, dump["rpn_raw"][0])
        roi = det.roi_head
        if roi is None:
            return
        sem_feat = None
        if "semantic" in dump and getattr(roi, "semantic_head", None) is not None:
            seg_pred, sem_feat = roi.semantic(ref_feats)
            rep.floats("semantic seg_pred", diff(seg_pred, dump["semantic"]["seg_pred"]))
            rep.floats("semantic feat", diff(sem_feat, dump["semantic"]["feat"]))
            sem_feat = dump["semantic"]["feat"].float().to(device)
        for st in dump["stages"]:
            t = int(st["stage"]) if st.get("stage") is not None else 0
            cls, reg = roi.box_stage(t, ref_feats, st["rois"].float().to(device), sem_feat)
            rep.floats(f"stage {t} cls_score ({len(st['rois'])} rois)", diff(cls, st["cls_score"]))
            rep.floats(f"stage {t} bbox_pred", diff(reg, st["bbox_pred"]))
        dets = roi.predict(ref_feats, [p.to(device) for p in ref_props], metas)[0]
        score_tol = score_tolerance(max(float(st["cls_score"].abs().max()) for st in dump["stages"]))
        compare_detections(dets, dump["result"], rep, roi, score_tol=score_tol)
        # and the whole model end to end on the input tensor
        dets_e2e = det.predict(inputs, metas)[0]
        compare_detections(dets_e2e, dump["result"], rep, roi, prefix="end-to-end ", score_tol=score_tol)


def compare_detections(dets, ref: dict, rep: Report, roi_head=None, prefix: str = "",
                       score_tol: float = SCORE_TOL) -> None:
    """Final detections one to one (label, box IoU > 0.99, scores within ``score_tol``); unmatched ones must
    be near-ties of the score threshold, the per-image cut or class-wise NMS. Matched masks need IoU > 0.99."""
    rb, rs, rl = ref["bboxes"].float(), ref["scores"].float(), ref["labels"].long()
    dets = dets.to("cpu")
    soft = roi_head is not None and getattr(roi_head, "nms_type", "nms") != "nms"
    cmp = compare_kept_sets(rb, rs, dets.boxes.float(), dets.scores.float(), rl, dets.labels.long(),
                            nms_iou=None if roi_head is None or soft else roi_head.nms_iou,
                            score_thr=None if roi_head is None else roi_head.score_thr,
                            top_k=None if roi_head is None else roi_head.max_per_img, score_tol=score_tol)
    rep.near_ties += cmp.near_ties
    rep.check(f"{prefix}detections", cmp.ok, str(cmp))
    if "masks_packed" in ref and dets.masks is not None and cmp.pairs:
        shape = ref["masks_shape"]
        ref_masks = np.unpackbits(ref["masks_packed"].numpy(), axis=-1, count=shape[-1]).astype(bool)
        ref_masks = torch.from_numpy(ref_masks.reshape(shape))
        worst = min(mask_iou(ref_masks[r], dets.masks[j]) for r, j in cmp.pairs)
        rep.check(f"{prefix}masks", worst > 0.99, f"min mask IoU {worst:.4f} over {len(cmp.pairs)} matched detections")


def compare_losses(det: Detector, dump: dict, rep: Report, device: str = "cpu") -> None:
    """Scalar losses, each within ``LOSS_RTOL`` of mmdet's: a sum over thousands of terms rounds differently
    per machine by ~1e-6 relative; 1e-4 also absorbs an IoU assignment flipped at its threshold. The RoI head
    runs on the dump's ``proposals`` (mmdet's), which are compared with ours as sets, near-ties counted."""
    parts = (("rpn_head", det.rpn_head), ("roi_head", det.roi_head))
    budgets = {f"{part}.{name}": sampler.num for part, module in parts
               for name in ("sampler", "ga_sampler") if (sampler := getattr(module, name, None)) is not None}
    limited = {k: v for k, v in budgets.items() if v is not None}
    if limited:
        # mmdet's loss dumps keep every candidate (num=10**7); a random subset would make the losses differ
        raise ValueError(f"loss parity needs samplers that keep every candidate; {limited} have a budget: set "
                         "their init_args num: null in the config (as configs/parity/*.yaml do)")
    det.train()
    inputs = dump["inputs"].float().to(device)
    h, w = inputs.shape[-2:]
    t = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in dump["targets"].items()}
    target = {"boxes": t["boxes"].float(), "labels": t["labels"].long(), "masks": t["masks"].to(torch.uint8),
              "crowd_boxes": torch.zeros(0, 4, device=device),
              "meta": ImageMeta(image_id=0, orig_size=(h, w), img_size=(h, w), pad_size=(h, w),
                                scale_factor=(1.0, 1.0), flip=False)}
    if det.with_semantic:
        target["semantic"] = t["semantic"].long()
    torch.manual_seed(int(dump.get("seed", 0)))
    # Detector.loss step by step, so that the RoI head takes the reference's proposals: a proposal that NMS or
    # a top-k cut kept on one side only (a decision within rounding of its boundary) would change every stage's
    # sample count and so its normalisers. The proposal sets are compared on their own, tie-aware.
    img_sizes = [(h, w)]
    feats = det.extract_feats(inputs)
    raw = det.rpn_head(feats)
    losses = dict(det.rpn_head.loss(raw, [target], img_sizes))
    if det.roi_head is not None:
        with torch.no_grad():
            props = det.rpn_head.proposals(raw, img_sizes, det.rpn_head.train_settings)
        if "proposals" in dump:
            compare_proposals(rep, det.rpn_head, props, [p.float() for p in dump["proposals"]], prefix="training ",
                              settings=det.rpn_head.train_settings)
            props = [p.float().to(device) for p in dump["proposals"]]
        else:
            rep.check("training proposals", True, "not in this dump (tests/fixtures/oracle/add_loss_proposals.py "
                      "adds them): the RoI-head losses are on ours, a near-tie upstream may move them")
        losses.update(det.roi_head.loss(feats, props, [target]))
    ref = dump["losses"]
    used: set[str] = set()
    for name, value in sorted(losses.items()):
        ref_name = next((n for n in LOSS_NAMES.get(name, (name,)) if n in ref), None)
        if ref_name is None:
            rep.check(f"loss {name}", False, f"ours {float(value):.6f}, no mmdet counterpart")
            continue
        used.add(ref_name)
        ours, theirs = float(value.detach()), float(ref[ref_name])
        ok = abs(ours - theirs) <= LOSS_ATOL + LOSS_RTOL * abs(theirs)
        rel = abs(ours - theirs) / max(abs(theirs), 1e-12)
        if rel > rep.worst[0]:
            rep.worst = (rel, f"loss {name}")
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda: the same comparisons, the same tolerances")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    # TF32 would round matmuls and convolutions to 10 mantissa bits (1e-3 of scale): parity is an fp32 claim
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dump = torch.load(args.dump, map_location="cpu", weights_only=False)
    det = build_detector(args.config, args.set).to(args.device)
    report = load_mmdet_checkpoint(det, dump["state_dict"], strict=False)
    rep = Report()
    rep.check("load state_dict", report.ok,
              "all keys matched" if report.ok else
              f"missing {report.missing[:5]} unexpected {report.unexpected[:5]} mismatched {report.mismatched[:5]}")
    if args.losses:
        compare_losses(det, dump, rep, args.device)
    else:
        det.eval()
        compare_inference(det, dump, rep, args.device)
    print(rep.summary())
    print(f"parity: {'FAIL' if rep.failed else 'PASS'}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
