"""How GPU-ready a step is, counted on any machine: aten ops dispatched and host-device syncs, per part.

    python benchmarks/gpu_readiness.py                          # ours, HTC R-50-FPN, 320x320, 8 objects
    python benchmarks/gpu_readiness.py --vs-mmdet               # and mmdetection 3.3.0, same run (oracle venv)
    python benchmarks/gpu_readiness.py --where 15               # the source lines the syncs come from
    python benchmarks/gpu_readiness.py --device cuda --vs-mmdet # on a GPU: counts and timings

On a fast GPU a detector's step is bound less by FLOPs than by how often the host waits for the device
and by how many kernels it launches; both are visible without a GPU. A ``TorchDispatchMode`` sees every
aten op the step dispatches (forward, backward and optimizer; composite ops arrive decomposed, roughly one
per kernel launch, views included) and flags the ones that make the host wait for the device:
``_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``), ``equal``/``is_nonzero``/``bincount``, ``nonzero``,
``masked_select``, ``unique*``, ``index``/``index_put_`` with a boolean index, ``repeat_interleave`` with
tensor repeats and no ``output_size``, and the Python-side ``Tensor.tolist``/``Tensor.numpy``. Calls of
torchvision's ``nms`` are counted in a column of their own: its CUDA kernel copies its mask to the host, a
sync neither implementation can avoid per NMS call. RoIAlign is torchvision's, as on CUDA (the opt-in
vectorised CPU kernel, ``htc_lightning.accel.roi_align_cpu``, stays off). The optimizer is SGD
with ``foreach=True``, what it picks on CUDA. Training is one step at ``--train-batch``, inference one
``predict`` at ``--infer-batch``; a warm-up step runs uncounted first.

Parts are the innermost instrumented call: backbone+neck, proposal generator, its targets/sampling (assign,
sample, anchor targets), semantic head, each box and mask stage (heads and losses), RoI targets/sampling
(assign, sample, box and mask targets), nms, mask pasting, backward, optimizer, other (glue). ``--vs-mmdet``
needs mmdet importable (the oracle venv: ``bash ../shared/oracle/setup.sh``) and builds its model through
``htc_speed.py``'s oracle mechanism, each measurement in a fresh process.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from htc_speed import _time, mmdet_model_and_samples, ours_model_and_batch, run_isolated  # noqa: E402

SYNC_KINDS = ("item", "nonzero", "bool index", "unique", "masked_select", "repeat_interleave", "tolist")
_UNIQUE = {"_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"}
_INDEX = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"}


def sync_kind(func, args, kwargs) -> str | None:
    """Which host-device sync an aten op implies on CUDA, or None."""
    name = func.overloadpacket.__name__
    ns = func.namespace
    if ns == "torchvision":
        return "nms" if name == "nms" else None
    if ns != "aten":
        return None
    if name in ("_local_scalar_dense", "equal", "is_nonzero", "bincount"):  # CUDA bincount reads its max
        return "item"
    if name == "nonzero":
        return "nonzero"
    if name == "masked_select":
        return "masked_select"
    if name in _UNIQUE:
        return "unique"
    if name in _INDEX:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "bool index"
        return None
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 and func._overloadname != "Tensor" else args[0]
        tensor_repeats = hasattr(repeats, "dim") and func._overloadname in ("Tensor", "self_Tensor")
        if tensor_repeats and kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None):
            return "repeat_interleave"
    return None


class Part:
    """The stack of named parts the counter attributes each op to (innermost wins)."""

    def __init__(self) -> None:
        self.stack = ["other"]

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()

    @property
    def current(self) -> str:
        return self.stack[-1]

    def wrap(self, owner, attr: str, name) -> None:
        """Attribute calls of ``owner.attr`` (an instance's method or a module's function: each measurement
        runs in its own process, so nothing is restored) to ``name``, a string or a function of the call's
        arguments."""
        fn = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            with self(name(*args, **kwargs) if callable(name) else name):
                return fn(*args, **kwargs)

        setattr(owner, attr, wrapped)


def make_counter(parts: Part, where: bool):
    """A ``TorchDispatchMode`` counting ops and syncs per part; with ``where`` also each sync's source line."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()
            self.syncs: Counter = Counter()  # (part, kind)
            self.lines: Counter = Counter()  # (kind, file:line)
            self.op_names: Counter = Counter()  # (part, aten op)
            self._saved = {}

        def _sync(self, kind: str) -> None:
            self.syncs[(parts.current, kind)] += 1
            if where:
                self.lines[(kind, _call_site())] += 1

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.ops[parts.current] += 1
            self.op_names[(parts.current, str(func.overloadpacket.__name__))] += 1
            kind = sync_kind(func, args, kwargs)
            if kind:
                self._sync(kind)
            return func(*args, **kwargs)

        def __enter__(self):
            # tolist/numpy read the data on the host without dispatching an op that says so
            for attr in ("tolist", "numpy"):
                original = getattr(torch.Tensor, attr)
                self._saved[attr] = original

                def counted(t, *a, _original=original, **k):
                    self._sync("tolist")
                    return _original(t, *a, **k)

                setattr(torch.Tensor, attr, counted)
            return super().__enter__()

        def __exit__(self, *exc):
            for attr, original in self._saved.items():
                setattr(torch.Tensor, attr, original)
            return super().__exit__(*exc)

    return Counts()


def _call_site() -> str:
    # the innermost frame of the model's code (ours or mmdet/mmcv), not torch's or this file's
    for frame in reversed(traceback.extract_stack()[:-3]):
        short = frame.filename.split("site-packages/")[-1].split(str(ROOT) + "/")[-1]
        if short.startswith(("htc_lightning", "mmdet", "mmcv", "mmengine")):
            return f"{short}:{frame.lineno} {frame.name}"
    return "(outside the model)"


def instrument_ours(det, parts: Part) -> None:
    import htc_lightning.models.proposals.ga_rpn as ga_rpn_mod
    import htc_lightning.models.proposals.rpn as rpn_mod
    import htc_lightning.models.roi_heads.cascade as cascade_mod
    import htc_lightning.models.roi_heads.mask_head as mask_head_mod

    parts.wrap(det, "extract_feats", "backbone+neck")
    rpn = det.rpn_head
    for attr in ("forward", "loss", "proposals"):
        parts.wrap(rpn, attr, "proposal generator")
    # the anchor targets of RPN and GA-RPN, and GA-RPN's location and shape targets
    parts.wrap(rpn_mod, "anchor_targets", "proposal targets/sampling")
    for fn in ("anchor_targets", "location_targets", "shape_targets"):
        parts.wrap(ga_rpn_mod, fn, "proposal targets/sampling")
    roi = det.roi_head
    if roi is None:
        return
    if roi.semantic_head is not None:
        parts.wrap(roi.semantic_head, "forward", "semantic head")
        parts.wrap(roi.semantic_head, "loss", "semantic head")
    parts.wrap(roi, "box_stage", lambda stage, *a, **k: f"box stage {int(stage)}")
    parts.wrap(roi, "_refine", lambda stage, *a, **k: f"box stage {int(stage)}")
    parts.wrap(roi, "mask_stage", lambda stage, *a, **k: f"mask stage {int(stage)}")
    for t, head in enumerate(roi.bbox_head):
        parts.wrap(head, "loss", f"box stage {t}")
        parts.wrap(head, "targets", "RoI targets/sampling")
    if roi.with_mask:
        for t, head in enumerate(roi.mask_head):
            parts.wrap(head, "loss", f"mask stage {t}")
        parts.wrap(roi, "mask_probs", "mask heads")
    parts.wrap(mask_head_mod, "mask_targets", "RoI targets/sampling")
    parts.wrap(roi, "_sample", "RoI targets/sampling")
    parts.wrap(cascade_mod, "multiclass_nms", "nms")
    parts.wrap(cascade_mod, "paste_masks", "paste masks")


def instrument_mmdet(model, parts: Part) -> None:
    parts.wrap(model, "extract_feat", "backbone+neck")
    rpn = model.rpn_head
    for attr in ("loss_and_predict", "predict"):
        parts.wrap(rpn, attr, "proposal generator")
    parts.wrap(rpn, "get_targets", "proposal targets/sampling")
    roi = model.roi_head
    parts.wrap(roi.semantic_head, "forward", "semantic head")
    parts.wrap(roi.semantic_head, "loss", "semantic head")
    for attr in ("_bbox_forward", "bbox_loss"):
        parts.wrap(roi, attr, lambda stage, *a, **k: f"box stage {int(stage)}")
    for attr in ("_mask_forward", "mask_loss"):
        parts.wrap(roi, attr, lambda stage, *a, **k: f"mask stage {int(stage)}")
    for t in range(roi.num_stages):
        parts.wrap(roi.bbox_assigner[t], "assign", "RoI targets/sampling")
        parts.wrap(roi.bbox_sampler[t], "sample", "RoI targets/sampling")
        parts.wrap(roi.bbox_head[t], "get_targets", "RoI targets/sampling")
        parts.wrap(roi.mask_head[t], "get_targets", "RoI targets/sampling")
    parts.wrap(roi, "predict_mask", "mask heads")
    import mmdet.models.roi_heads.bbox_heads.bbox_head as bbox_head_mod
    import mmdet.models.roi_heads.mask_heads.fcn_mask_head as fcn_mod

    parts.wrap(bbox_head_mod, "multiclass_nms", "nms")
    parts.wrap(fcn_mod, "_do_paste_mask", "paste masks")


def _step(model, images, batch, mode: str, parts: Part, loss_fn):
    if mode == "inference":
        model.eval()

        def step():
            with torch.no_grad():
                batch["predict"]()
        return step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        with parts("backward"):
            loss.backward()
        with parts("optimizer"):
            opt.step()
    return step


def measure(opts: dict) -> dict:
    """One implementation ("ours" or "mmdet"), one mode: counts per part (and timings on CUDA)."""
    torch.set_num_threads(opts["threads"])
    torch.manual_seed(0)
    parts = Part()
    batch_size = opts["batch"]
    if opts["impl"] == "ours":
        det, images, targets = ours_model_and_batch(opts)
        instrument_ours(det, parts)
        metas = [t["meta"] for t in targets]
        actions = {"predict": lambda: det.predict(images, metas)}

        def loss_fn():
            return sum(det.loss(images, targets).values())
        model = det
    else:
        model, images, samples = mmdet_model_and_samples(opts)
        instrument_mmdet(model, parts)
        actions = {"predict": lambda: model.predict(images, samples)}

        def loss_fn():
            return model.parse_losses(model.loss(images, samples))[0]
    step = _step(model, images, actions, opts["mode"], parts, loss_fn)
    step()  # warm-up: lazy initialisation is not a per-step cost
    counter = make_counter(parts, opts["where"] > 0)
    with counter:
        step()
    seconds = _time(step, opts["runs"], 1, opts["device"]) if opts["device"] == "cuda" else None
    return {"ops": dict(counter.ops), "syncs": {f"{p}|{k}": n for (p, k), n in counter.syncs.items()},
            "lines": {f"{k}|{line}": n for (k, line), n in counter.lines.most_common(opts["where"])},
            "top_ops": {f"{p}|{op}": n for (p, op), n in counter.op_names.most_common(opts["top_ops"])},
            "seconds": seconds, "batch": batch_size}


PART_ORDER = ("backbone+neck", "proposal generator", "proposal targets/sampling", "semantic head",
              *(f"{b} stage {t}" for t in range(3) for b in ("box", "mask")), "RoI targets/sampling", "nms",
              "mask heads", "paste masks", "backward", "optimizer", "other")


def print_table(title: str, results: dict[str, dict]) -> None:
    """One table per mode: rows are parts; per implementation its ops, syncs and NMS calls (torchvision's CUDA
    ``nms`` copies its suppression mask to the host: a sync inside the kernel, kept apart from the total)."""
    impls = [k for k in ("ours", "mmdet") if k in results and "error" not in results[k]]
    print(f"\n{title}")
    head = "| part                        |" + "".join(f" {i + ' ops':>10s} | {i + ' syncs':>11s} | {i + ' nms':>9s} |"
                                                   for i in impls)
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    syncs = {i: _by_part(results[i], lambda kind: kind != "nms") for i in impls}
    nms = {i: _by_part(results[i], lambda kind: kind == "nms") for i in impls}
    names = [p for p in PART_ORDER if any(p in results[i]["ops"] for i in impls)]
    for p in names:
        print(f"| {p:27s} |" + "".join(f" {results[i]['ops'].get(p, 0):10,d} | {syncs[i].get(p, 0):11d} | "
                                       f"{nms[i].get(p, 0):9d} |" for i in impls))
    print(f"| {'total':27s} |" + "".join(f" {sum(results[i]['ops'].values()):10,d} | {sum(syncs[i].values()):11d} | "
                                         f"{sum(nms[i].values()):9d} |" for i in impls))
    for i in impls:
        kinds = Counter()
        for key, n in results[i]["syncs"].items():
            kinds[key.split("|")[1]] += n
        print(f"  {i} syncs by kind: " + (", ".join(f"{k} {kinds[k]}" for k in SYNC_KINDS if kinds[k]) or "none"))
        if results[i]["seconds"] is not None:
            print(f"  {i} time per step: {results[i]['seconds'] * 1e3:.1f} ms "
                  f"({results[i]['batch'] / results[i]['seconds']:.2f} img/s)")
        for key, n in results[i]["lines"].items():
            kind, line = key.split("|", 1)
            print(f"  {i} {n:5d} {kind:13s} {line}")
        for key, n in results[i]["top_ops"].items():
            part, op = key.split("|", 1)
            print(f"  {i} {n:5d} ops {op:28s} in {part}")
    if "ours" in impls and "mmdet" in impls:
        ours, ref = results["ours"], results["mmdet"]
        print(f"  ours/mmdet: ops {sum(ours['ops'].values()) / sum(ref['ops'].values()):.2f}x, syncs "
              f"{sum(syncs['ours'].values())} vs {sum(syncs['mmdet'].values())}")
    for i, r in results.items():
        if "error" in r:
            print(f"  {i}: error: {r['error']}")


def _by_part(result: dict, keep) -> Counter:
    out = Counter()
    for key, n in result["syncs"].items():
        part, kind = key.split("|")
        if keep(kind):
            out[part] += n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "htc" / "htc_r50_fpn_1x_coco.yaml"))
    ap.add_argument("--height", type=int, default=320)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--infer-batch", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--runs", type=int, default=5, help="timed steps on CUDA (median)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--vs-mmdet", action="store_true", help="also count mmdetection 3.3.0's HTC, same setting")
    ap.add_argument("--mmcv-shim", default=str(ROOT.parent / "shared" / "oracle"),
                    help="folder holding mmcv_ops_shim.py")
    ap.add_argument("--where", type=int, default=0, help="print the N source lines with the most syncs")
    ap.add_argument("--top-ops", type=int, default=0, help="print the N most dispatched (part, op) pairs")
    args = ap.parse_args()

    base = dict(config=args.config, height=args.height, width=args.width, objects=args.objects,
                device=args.device, runs=args.runs, threads=args.threads, mmcv_shim=args.mmcv_shim,
                where=args.where, top_ops=args.top_ops)
    print(f"GPU readiness: {Path(args.config).name} at {args.height}x{args.width}, {args.objects} objects/image, "
          f"device {args.device}")
    for mode in args.modes:
        batch = args.train_batch if mode == "train" else args.infer_batch
        results = {}
        for impl in ("ours", "mmdet") if args.vs_mmdet else ("ours",):
            results[impl] = run_isolated(measure, {**base, "impl": impl, "mode": mode, "batch": batch})
        what = "training step (forward, backward, SGD)" if mode == "train" else "inference (predict)"
        print_table(f"{what}, batch {batch}", results)


if __name__ == "__main__":
    main()
