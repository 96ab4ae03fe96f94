"""DataLoader workers and SIGTERM: a plain script that iterates our loaders with workers exits; a SIGTERM from
anyone but the main process (a cluster signalling the whole process group) leaves the workers running, so the
main process can still finish its step and write its checkpoint (tests/test_sigterm_process_group.py runs that
through the CLI)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REAL_COCO = Path(__file__).parent / "fixtures" / "coco_tiny"
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="workers keep the default SIGTERM here")

SCRIPT = textwrap.dedent("""
    import multiprocessing, sys
    from htc_lightning.data.datamodule import CocoDataModule

    dm = CocoDataModule(sys.argv[1], train_scales=[(96, 96)], test_scale=(96, 96), batch_size=1,
                        val_batch_size=1, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = iter(loader)
    next(batches)
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    if sys.argv[2] == "wait":
        sys.stdin.readline()  # the test signals the workers meanwhile
    seen = 1 + sum(1 for _ in batches) + sum(1 for _ in dm.val_dataloader())
    print("batches", seen, flush=True)
    # the script ends with the persistent workers alive: multiprocessing's exit handler SIGTERMs and joins them
""")


def run_script(mode: str, timeout: float = 120) -> tuple[subprocess.Popen, list[int]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(REAL_COCO), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    workers = [int(p) for p in proc.stdout.readline().split()]
    return proc, workers


def finish(proc: subprocess.Popen, stdin: str = "", timeout: float = 120) -> tuple[str, str]:
    try:
        return proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the script did not exit within {timeout} s: {out}{err[-2000:]}")


def test_a_script_iterating_the_loaders_with_workers_exits():
    proc, workers = run_script("go")
    out, err = finish(proc)
    assert len(workers) == 2, err[-2000:]
    assert proc.returncode == 0, err[-2000:]
    assert "batches 6" in out  # 4 train + 2 val images, one per batch


def test_workers_outlive_a_sigterm_from_another_process():
    proc, workers = run_script("wait")
    assert len(workers) == 2, proc.stderr.read()[-2000:]
    for pid in workers:  # from this process, not the workers' parent: as the cluster's signal to the whole group
        os.kill(pid, signal.SIGTERM)
    out, err = finish(proc, "go\n")
    assert proc.returncode == 0, err[-2000:]
    assert "batches 6" in out
