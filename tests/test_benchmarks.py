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
        assert images_per_s == pytest.approx(int(r[2]) / seconds, rel=0.01)


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
    ops = [line for line in out.splitlines() if re.match(rf"\| (aten|torchvision)::\S+ +\| +\d+ \| +{NUMBER}", line)]
    assert len(ops) == 5


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


def test_eval_vs_torchmetrics_prints_both_rows_with_the_same_ap():
    out = run("eval_vs_torchmetrics.py", "--num-images", "6", "--dets-per-image", "20")
    (ours,), (theirs,) = table_rows(out, "ours"), table_rows(out, "torchmetrics")
    assert ours[-2:] == theirs[-2:]  # box AP and mask AP, printed to 4 decimals
    assert float(ours[-2]) > 0
