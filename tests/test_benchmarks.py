"""The benchmark scripts run end to end at toy sizes and print their tables: a benchmark that has rotted is
found here, not on the day someone needs its numbers. Timings themselves are not checked (behaviour only)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
NUMBER = r"[0-9]+\.[0-9]+"


def run(script: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("|")]
    return [r for r in rows if r[0] == first_cell]


def test_htc_speed_measures_inference_and_training_in_each_variant():
    out = run("htc_speed.py", "--config", "configs/parity/htc_tiny.yaml", "--height", "96", "--width", "128",
              "--objects", "2", "--runs", "1", "--warmup", "1", "--batch-sizes", "2", "--precisions", "32",
              "bf16-mixed", "--threads", "1")
    rows = table_rows(out, "htc-lightning")
    # (mode, batch, precision) of every row: inference at batch 1, training at the requested batch size
    assert [(r[1], r[2], r[3]) for r in rows] == [("inference", "1", "32"), ("inference", "1", "bf16-mixed"),
                                                  ("train", "2", "32"), ("train", "2", "bf16-mixed")]
    for r in rows:
        seconds, images_per_s, peak_gb = float(r[5]), float(r[6]), float(r[7])
        assert seconds > 0 and peak_gb > 0
        # both printed with 2 decimals: the rounding of each bounds the disagreement
        assert images_per_s == pytest.approx(int(r[2]) / seconds, rel=0.01, abs=0.006)


def test_htc_speed_reports_an_unavailable_mmdet_as_an_error_row(tmp_path):
    # an empty folder as the mmcv shim: the mmdet measurement fails to import, and says so in its row
    out = run("htc_speed.py", "--config", "configs/parity/htc_tiny.yaml", "--height", "64", "--width", "64",
              "--runs", "1", "--warmup", "0", "--skip-train", "--vs-mmdet", "--mmcv-shim", str(tmp_path),
              "--threads", "1")
    assert re.search(r"\| mmdet 3\.3\.0 .*error: ", out)
    assert len(table_rows(out, "htc-lightning")) == 1


def test_profile_htc_prints_the_parts_and_operators_tables():
    out = run("profile_htc.py", "--config", "configs/parity/htc_tiny.yaml", "--height", "96", "--width", "128",
              "--runs", "1", "--warmup", "1", "--threads", "1", "--top", "5")
    parts = {r[0]: float(r[1]) for r in (table_rows(out, p) for p in ("backbone", "roi_head", "mask_heads"))
             for r in r}
    assert set(parts) == {"backbone", "roi_head", "mask_heads"} and all(v > 0 for v in parts.values())
    # which operators are hottest, and how many distinct ones there are, depends on the machine's kernels:
    # only the table's shape is checked (a header, 1 to --top rows, sorted by time, shares of the step)
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| operator (self time)"))
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        name, calls, ms, share = (c.strip() for c in line.strip().strip("|").split("|"))
        rows.append((name, int(calls), float(ms), float(share)))
    assert 1 <= len(rows) <= 5
    assert all(name and calls >= 1 and ms >= 0 and 0 <= share <= 100 for name, calls, ms, share in rows)
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)
    assert sum(r[3] for r in rows) <= 100.5


def test_roi_align_speed_compares_forward_and_backward_with_torchvision():
    out = run("roi_align_speed.py", "--batch", "1", "--channels", "256", "--size", "24", "--rois", "16",
              "--outputs", "14", "--threads", "1", "--runs", "1", "--avg-pool", "2")
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+1\s+14\s+16 \|", line)]
    assert len(rows) == 1
    # the printed max |diff| of the outputs and of the gradients: ours equals torchvision up to float rounding
    diffs = [float(x) for x in rows[0] if re.fullmatch(r"[0-9.]+e[-+][0-9]+", x)]
    assert len(diffs) == 2 and max(diffs) < 1e-4


def test_eval_speed_backends_agree():
    out = run("eval_speed.py", "--num-images", "12", "--runs", "1", "--warmup", "0")
    assert {r[0] for r in table_rows(out, "bbox") + table_rows(out, "segm") + table_rows(out, "both")} == \
        {"bbox", "segm", "both"}
    # the script itself exits non-zero past 1e-12; both backends compute the same AP up to float rounding
    diff = re.search(r"max \|pycocotools - faster-coco-eval\| over all 24 metrics: (\S+)", out)
    assert diff and float(diff.group(1)) <= 1e-12


def test_data_throughput_prints_images_per_second_per_pipeline():
    out = run("data_throughput.py", "--images", "4", "--runs", "1")
    rows = [r for name in ("instances", "instances + pad", "instances + stuff map", "instances + stuff map + pad")
            for r in table_rows(out, name)]
    assert len(rows) == 4 and all(float(r[1]) > 0 for r in rows)


GPU_PARTS = ("backbone+neck", "proposal generator", "proposal targets/sampling", "semantic head", "box stage 0",
             "mask stage 0", "box stage 1", "mask stage 1", "box stage 2", "mask stage 2", "RoI targets/sampling",
             "nms", "mask heads", "paste masks", "backward", "optimizer", "other")


def _counts(table: str) -> dict[str, tuple[int, int, int]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ")]
    return {r[0]: tuple(int(c.replace(",", "")) for c in r[1:4]) for r in rows if r[0] != "part"}


def test_gpu_readiness_counts_ops_syncs_and_nms_calls_per_part_in_both_modes():
    out = run("gpu_readiness.py", "--config", "configs/parity/htc_tiny.yaml", "--height", "96", "--width", "128",
              "--objects", "2", "--threads", "1")
    train, infer = out.split("inference (predict)")
    assert "training step" in train
    for table, must in ((train, {"backbone+neck", "RoI targets/sampling", "box stage 2", "mask stage 2", "backward",
                                 "optimizer"}),
                        (infer, {"backbone+neck", "box stage 2", "nms", "mask heads", "paste masks"})):
        counts = _counts(table)
        parts = {k: v for k, v in counts.items() if k != "total"}
        assert must <= set(parts) <= set(GPU_PARTS)
        assert all(parts[p][0] > 0 for p in must)
        # the total row is the sum of the parts, column by column
        assert counts["total"] == tuple(sum(v[i] for v in parts.values()) for i in range(3))
    assert "backward" not in _counts(infer)


def _ours(mode: str, batch: int) -> dict:
    sys.path.insert(0, str(BENCH))
    from gpu_readiness import measure
    from htc_speed import run_isolated

    # in a fresh process: the counter instruments module functions, which must not leak into other tests
    result = run_isolated(measure, dict(config=str(ROOT / "configs" / "parity" / "htc_tiny.yaml"), height=128,
                                        width=128, objects=4, device="cpu", runs=1, threads=1, mmcv_shim="",
                                        where=0, top_ops=0, impl="ours", mode=mode, batch=batch))
    assert "error" not in result, result
    return result


def _syncs(result: dict) -> int:
    return sum(n for key, n in result["syncs"].items() if not key.endswith("|nms"))


# From the final count of the tiny HTC (benchmarks/gpu_readiness.py, issue 18): per training step at batch 2,
# 2 RPN box filters + 2 RPN and 6 RoI sample-size transfers + 6 per-level RoI groupings; per inference, the RPN
# filter, 4 RoI groupings, the score threshold, the per-class grouping of the NMS and the paste windows.
TRAIN_SYNC_BUDGET = 16
INFERENCE_SYNC_BUDGET = 8


def test_tiny_htc_training_step_stays_within_its_sync_budget():
    assert _syncs(_ours("train", 2)) <= TRAIN_SYNC_BUDGET


def test_tiny_htc_inference_stays_within_its_sync_budget():
    assert _syncs(_ours("inference", 1)) <= INFERENCE_SYNC_BUDGET


def test_eval_vs_torchmetrics_prints_both_rows_with_the_same_ap():
    out = run("eval_vs_torchmetrics.py", "--num-images", "6", "--dets-per-image", "20")
    (ours,), (theirs,) = table_rows(out, "ours"), table_rows(out, "torchmetrics")
    assert ours[-2:] == theirs[-2:]  # box AP and mask AP, printed to 4 decimals
    assert float(ours[-2]) > 0


def test_proposal_ar_prints_recall_and_what_the_ga_location_filter_keeps():
    out = run("proposal_ar.py", "--iters", "2", "--num-train", "4", "--num-val", "2", "--size", "64",
              "--variants", "rpn", "ga", "--threads", "1")
    (rpn,), (ga,) = table_rows(out, "rpn"), table_rows(out, "ga")
    assert all(0.0 <= float(v) <= 1.0 for v in rpn[1:4] + ga[1:4])  # AR@100/300/1000
    assert rpn[8] == "-" and rpn[9] == "-"  # no location filter in the plain RPN
    assert float(ga[8]) > 0
    assert re.fullmatch(rf"{NUMBER} / {NUMBER}", ga[9])


def test_centre_kept_reads_the_location_under_each_box_centre_on_every_level():
    import torch

    sys.path.insert(0, str(BENCH))
    from proposal_ar import centre_kept

    fine, coarse = torch.zeros((1, 1, 8, 8), dtype=torch.bool), torch.zeros((1, 1, 4, 4), dtype=torch.bool)
    fine[0, 0, 1, 2] = True    # stride 4: the location covering x 8-12, y 4-8
    coarse[0, 0, 3, 3] = True  # stride 8: x 24-32, y 24-32
    boxes = torch.tensor([[6.0, 2.0, 14.0, 10.0],    # centre (10, 6): kept on the fine level
                          [20.0, 20.0, 36.0, 36.0],  # centre (28, 28): kept on the coarse level
                          [0.0, 0.0, 4.0, 4.0]])     # centre (2, 2): kept nowhere
    assert centre_kept([fine, coarse], (4, 8), boxes, 0).tolist() == [True, True, False]


def test_real_coco_overfit_prints_the_loss_curve_and_an_ap_row_per_evaluation():
    out = run("real_coco_overfit.py", "--coco", str(ROOT / "tests" / "fixtures" / "coco_tiny"), "--images", "4",
              "--size", "64", "--steps", "2", "--eval-every", "1", "--log-every", "1", "--warmup", "1")
    assert "4 images (36 annotations)" in out and "80 classes" in out
    assert len(re.findall(r"^step +[12] ", out, re.M)) == 2  # the loss curve
    rows = table_rows(out, "1") + table_rows(out, "2")
    assert len(rows) == 2 and all(0.0 <= float(v) <= 1.0 for row in rows for v in row[2:])


def test_data_scale_measures_set_up_workers_evaluation_and_throughput_before_and_after(tmp_path):
    # "before" is HEAD's code here (any commit works); the real comparison is in the issue-26 note
    out = run("data_scale.py", "--scale", "0.001", "--workdir", str(tmp_path), "--before", "HEAD",
              "--coco-tiny", str(ROOT / "tests/fixtures/coco_real/images"), "--samples", "50", "--workers", "2",
              "--eval-images", "10", "--dets", "10", "--throughput-images", "2", timeout=600)
    rows = {r[0]: r[1:] for r in (line.strip().strip("|").split("|") for line in out.splitlines()
                                  if line.startswith("| ") and not line.startswith("| measure"))}
    rows = {k.strip(): [c.strip() for c in v] for k, v in rows.items()}
    assert rows["images kept (train=True)"][0] == rows["images kept (train=True)"][1] == "118"  # 0.001 x 118,287
    assert float(rows["set-up, cache filled (next run) (s)"][1]) >= 0
    assert "mapping" in rows["annotations per rank, USS (MB)"][1]
    assert rows["worker growth, 1 -> 50 samples (MB)"][2] == "<= 5"
    assert rows["eval segm mAP / bbox mAP"][0] == rows["eval segm mAP / bbox mAP"][1]
    assert rows["eval segm mAP / bbox mAP"][2] == "max diff 0.0e+00"
    wall, cpu = (float(v) for v in rows["images/s per worker, 1333x800 flip masks (wall / CPU)"][1].split("/"))
    assert wall > 0 and cpu > 0


def test_parity_machines_prints_a_row_per_setting_and_a_cell_per_family():
    # one setting and the smallest dump keep it cheap (not marked reference: make test would run it thrice; the
    # parity it prints is what the reference tests check)
    out = run("parity_machines.py", "--settings", "scalar-1t", "--dumps", "loss_ga_rpn_s1", timeout=600)
    header = next(line.split() for line in out.splitlines() if line.startswith("setting "))
    row = next(line.split() for line in out.splitlines() if line.startswith("scalar-1t "))
    assert header == ["setting", "ga_rpn", "losses"], out
    # the cell: worst normalised difference / near-ties accepted
    assert re.fullmatch(r"[0-9.]+e[-+][0-9]+", row[1]) and row[2] == "/" and row[3].isdigit(), out
