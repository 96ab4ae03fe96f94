"""mmdet parity on simulated machines: every oracle dump (tests/fixtures/oracle) through the parity tool under
settings that change which CPU kernels run, as other CPUs and thread counts would.

    python benchmarks/parity_machines.py                      # every setting below, every dump (slow: ~5 min each)
    python benchmarks/parity_machines.py --settings sse41-2t nomkldnn-1t --dumps loss_htc_s1

A setting is a set of environment variables read when torch starts (so each runs in its own process):
``ATEN_CPU_CAPABILITY`` picks PyTorch's own vectorised kernels (default = scalar, avx2, avx512);
``ONEDNN_MAX_CPU_ISA`` caps oneDNN's convolution kernels (SSE41, AVX, AVX2, AVX512_CORE); ``OMP_NUM_THREADS``
splits reductions differently; ``MKL_CBWR`` pins MKL's GEMM code path; and ``nomkldnn`` turns oneDNN off
(``torch.backends.mkldnn.enabled = False``: convolutions as im2col + GEMM). Prints a table of settings x
families, each cell the worst normalised difference over that family's dumps and the near-ties accepted
(``FAIL`` where a dump failed), then the failing dumps' FAIL lines.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DUMPS = ROOT / "tests" / "fixtures" / "oracle"
CONFIGS = ROOT / "configs" / "parity"
NO_MKLDNN = "HTC_PARITY_NO_MKLDNN"  # read by the worker only

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "scalar-1t": {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"},  # make test, second run
    "avx2-2t": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2"},
    "sse41-2t": {"ONEDNN_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "2"},  # issue 24's failure
    "avx2-sse41-2t": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "2"},
    "avx-1t": {"ONEDNN_MAX_CPU_ISA": "AVX", "OMP_NUM_THREADS": "1"},
    "avx2-3t": {"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "3"},
    "avx512-1t": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "OMP_NUM_THREADS": "1"},
    "nomkldnn-1t": {NO_MKLDNN: "1", "OMP_NUM_THREADS": "1"},
    "nomkldnn-scalar-2t": {NO_MKLDNN: "1", "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "2"},
    "mkl-compat-avx2-3t": {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "3"},
}

SUMMARY = re.compile(r"summary: largest normalised difference ([0-9.e+-]+).*near-ties accepted (\d+)")


def worker(stems: list[str]) -> None:
    """In this process's kernel setting: one JSON line per dump."""
    import torch

    if os.environ.get(NO_MKLDNN):
        torch.backends.mkldnn.enabled = False
    from htc_lightning.tools.mmdet_parity import FAMILY_CONFIG, family_of, main

    for stem in stems:
        args = ["--dump", str(DUMPS / f"{stem}.pt"), "--config", str(CONFIGS / FAMILY_CONFIG[family_of(stem)])]
        if stem.startswith("loss_"):
            args.insert(0, "--losses")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(args)
        found = SUMMARY.search(out.getvalue())
        print(json.dumps({"stem": stem, "family": family_of(stem), "ok": code == 0,
                          "worst": float(found.group(1)) if found else float("inf"),
                          "near_ties": int(found.group(2)) if found else 0,
                          "fails": [line for line in out.getvalue().splitlines() if line.startswith("FAIL")]}),
              flush=True)


def run_setting(name: str, stems: list[str]) -> tuple[list[dict], float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **SETTINGS[name]}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", *stems], env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(rows) != len(stems):
        rows.append({"stem": "(worker)", "family": "(worker)", "ok": False, "worst": float("inf"), "near_ties": 0,
                     "fails": [f"worker exited {proc.returncode}: {proc.stderr.strip()[-500:]}"]})
    return rows, time.perf_counter() - start


def cell(rows: list[dict]) -> str:
    if not rows:
        return "-"
    worst, ties = max(r["worst"] for r in rows), sum(r["near_ties"] for r in rows)
    return f"{'FAIL ' if not all(r['ok'] for r in rows) else ''}{worst:.1e} / {ties}"


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    """Runs the parity tool on the dumps in each setting, prints the table and returns {setting: one row per dump}
    (``stem``, ``family``, ``ok``, ``worst`` normalised difference, ``near_ties``, ``fails``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--dumps", nargs="*", help="dump stems (default: every tiny_* and loss_* dump)")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return {}
    stems = args.dumps or sorted(p.stem for p in DUMPS.glob("*.pt") if p.stem.startswith(("tiny_", "loss_")))
    results: dict[str, list[dict]] = {}
    for name in args.settings:
        rows, seconds = run_setting(name, stems)
        results[name] = rows
        print(f"{name}: {sum(r['ok'] for r in rows)}/{len(rows)} dumps pass, {seconds:.0f} s "
              f"({' '.join(f'{k}={v}' for k, v in SETTINGS[name].items()) or 'no variables'})", flush=True)
        for r in rows:  # as it comes, for a long sweep run in the background
            print(f"  {r['stem']:28s} {'ok  ' if r['ok'] else 'FAIL'} {r['worst']:.1e} / {r['near_ties']}", flush=True)
    kinds = [("inference", "tiny_"), ("losses", "loss_")]
    families = sorted({r["family"] for rows in results.values() for r in rows if r["family"] != "(worker)"})
    print("\nworst normalised difference / near-ties accepted, over each family's dumps\n")
    columns = [(f, k, prefix) for f in families for k, prefix in kinds
               if any(r["family"] == f and r["stem"].startswith(prefix) for rows in results.values() for r in rows)]
    header = ["setting"] + [f"{f} {k}" for f, k, _ in columns]
    table = [[name] + [cell([r for r in rows if r["family"] == f and r["stem"].startswith(prefix)])
                       for f, _, prefix in columns] for name, rows in results.items()]
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    failed = [(name, r) for name, rows in results.items() for r in rows if not r["ok"]]
    for name, r in failed:
        print(f"\n{name} {r['stem']}:\n  " + "\n  ".join(r["fails"][:10]))
    return results


if __name__ == "__main__":
    sys.exit(1 if any(not r["ok"] for rows in main().values() for r in rows) else 0)
