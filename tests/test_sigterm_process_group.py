"""A cluster's SIGTERM reaches the whole process group, DataLoader workers included (SLURM, `timeout`):
training must still write its checkpoint, and the run must resume from it."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from test_cli_real_htc import tiny_htc_config

HERE = Path(__file__).resolve().parent


def test_sigterm_to_the_process_group_with_workers_saves_a_resumable_checkpoint(tmp_path, coco_root):
    config = tiny_htc_config(tmp_path, coco_root, max_steps=10_000, max_epochs=1000, val_check_interval=None,
                             check_val_every_n_epoch=1000)
    text = Path(config).read_text().replace("num_workers: 0", "num_workers: 2")
    Path(config).write_text(text)
    marker = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(HERE / "_sigterm_child.py"), config, str(marker)],
                            start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and its DataLoader workers
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.exists(), out.decode()[-3000:]
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] >= 2
