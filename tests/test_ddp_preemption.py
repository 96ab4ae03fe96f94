"""Two CPU processes of the real tiny HTC (``configs/tiny/htc_tiny_synthetic.yaml``: random flips, two train
scales) under ``--trainer.strategy ddp``, preempted as a cluster does it: SIGTERM to every rank or to rank 0
only, SLURM's SIGUSR1 requeue signal, then resumed; and launched by hand as 2 nodes x 1 device on loopback.

Every job runs in its own process group with a hard timeout; on timeout the whole group is killed.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from htc_lightning.callbacks.faults import SIGTERM_EXIT_CODE

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
N_STEPS = 6  # 8 images, 1 per rank and step: 4 steps per epoch, so step 6 is past the epoch boundary and the lr step
CUT = 3
JOB_TIMEOUT = 240
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coco8(tmp_path_factory):
    from htc_lightning.data.synthetic import make_synthetic_coco

    return make_synthetic_coco(tmp_path_factory.mktemp("coco8"), num_train=8, num_val=2, seed=0, image_size=(64, 64))


def job_config(root: Path, coco: Path, callbacks: list[dict] = ()) -> str:
    config = yaml.safe_load((REPO / "configs" / "tiny" / "htc_tiny_synthetic.yaml").read_text())
    config["trainer"].update(max_steps=N_STEPS, limit_val_batches=0, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(root), callbacks=list(callbacks))
    config["model"]["init_args"]["max_epochs_schedule"] = [1]  # the lr drops 10x at the start of epoch 1
    config["data"]["init_args"].update(data_root=str(coco), train_scales=[[64, 64], [96, 96]], test_scale=[64, 64],
                                       batch_size=1, num_workers=0)
    root.mkdir(parents=True, exist_ok=True)
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def signal_at(step: int, name: str = "SIGTERM", ranks: str = "all", marker: Path | None = None) -> dict:
    return {"class_path": "_ddp_signal.SignalAtStep",
            "init_args": {"step": step, "signal_name": name, "ranks": ranks, "marker": str(marker) if marker else None}}


def job_env(**extra: str) -> dict[str, str]:
    # one intra-op thread per process whatever the launch, so that every launch computes the same sums
    path = os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}
    for key in [k for k in env if k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"))]:
        if key not in extra:
            del env[key]
    return env


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run_processes(commands: list[tuple[list[str], dict]], log: Path, marker: Path | None = None) -> list[int]:
    """Start each command in a new process group and wait for all; every process of the groups (the ranks the
    ``ddp`` launcher starts included) must be gone within 60 s of the first ``marker`` file (the signal)."""
    procs: list[subprocess.Popen] = []
    with open(log, "wb") as out:
        try:
            for cmd, env in commands:
                procs.append(subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            deadline = time.time() + JOB_TIMEOUT
            while any(group_alive(p.pid) for p in procs):
                for p in procs:
                    p.poll()  # reaps a finished leader, so that its group can become empty
                signalled = sorted(log.parent.glob(f"{marker.name}.rank*")) if marker else []
                if signalled:
                    deadline = min(deadline, min(p.stat().st_mtime for p in signalled) + 60)
                assert time.time() < deadline, f"processes still running (log {log}):\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
        finally:
            for p in procs:
                if group_alive(p.pid):
                    os.killpg(p.pid, signal.SIGKILL)
    return [p.wait() for p in procs]


def fit_cmd(config: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), "fit", "--config", config, *args]


def ddp_job(config: str, log: Path, *args: str, marker: Path | None = None) -> int:
    cmd = fit_cmd(config, "--trainer.strategy", "ddp", "--trainer.devices", "2", *args)
    return run_processes([(cmd, job_env())], log, marker)[0]


def weights(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["global_step"], ckpt["state_dict"]


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, coco8):
    """The 1 node x 2 devices run of N_STEPS steps, never interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted") / "run"
    rc = ddp_job(job_config(root, coco8), root.parent / "log.txt")
    assert rc == 0, (root.parent / "log.txt").read_text()[-3000:]
    return weights(root / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, coco8):
    """The same job, SIGTERM to every rank after step CUT."""
    root = tmp_path_factory.mktemp("preempted") / "run"
    marker = root.parent / "signalled"
    config = job_config(root, coco8, [signal_at(CUT, marker=marker)])
    rc = ddp_job(config, root.parent / "log.txt", marker=marker)
    return rc, root, config


def test_sigterm_to_every_rank_saves_last_ckpt_at_that_step_and_every_process_exits(preempted):
    rc, root, _ = preempted
    log = (root.parent / "log.txt").read_text()
    assert rc == SIGTERM_EXIT_CODE, log[-3000:]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]  # no temp file, no duplicate
    assert weights(root / "checkpoints" / "last.ckpt")[0] == CUT
    assert "every rank stops after step 3" in log


def test_resume_after_ddp_sigterm_equals_the_uninterrupted_run_bit_for_bit(preempted, uninterrupted, coco8):
    rc, root, _ = preempted
    assert rc == SIGTERM_EXIT_CODE
    # the requeued job: the same command without the signal, resuming from the newest last checkpoint
    config = job_config(root, coco8)
    assert ddp_job(config, root.parent / "resume_log.txt", "--ckpt_path", "last") == 0
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]  # overwritten, no last-v1
    step, got = weights(root / "checkpoints" / "last.ckpt")
    assert step == N_STEPS == uninterrupted[0]
    assert_same_weights(got, uninterrupted[1])


def test_sigterm_to_rank_zero_only_stops_every_rank_after_the_same_step(tmp_path, coco8):
    root = tmp_path / "run"
    marker = tmp_path / "signalled"
    config = job_config(root, coco8, [signal_at(CUT, ranks="0", marker=marker)])
    rc = ddp_job(config, tmp_path / "log.txt", marker=marker)
    assert rc == SIGTERM_EXIT_CODE, (tmp_path / "log.txt").read_text()[-3000:]
    assert [p.name for p in tmp_path.glob("signalled.rank*")] == ["signalled.rank0"]
    assert weights(root / "checkpoints" / "last.ckpt")[0] == CUT


def slurm_env(rank: int, port: str, bin_dir: Path, log: Path) -> dict[str, str]:
    return job_env(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NAME="htc_train", SLURM_JOB_ID="4242",
                   SLURM_NODELIST="localhost", SLURM_NNODES="1", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   SLURM_NODEID="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, SCONTROL_LOG=str(log),
                   PATH=os.pathsep.join([str(bin_dir), os.environ["PATH"]]))


def test_slurm_requeue_signal_under_two_processes_checkpoints_requeues_once_and_sigterm_then_stops(tmp_path, coco8):
    # srun's two tasks, started by hand with SLURM's variables; `scontrol` is a script that records its arguments
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    scontrol_log = tmp_path / "scontrol.txt"
    root = tmp_path / "run"
    marker = tmp_path / "signalled"
    slurm = {"class_path": "lightning_fabric.plugins.environments.SLURMEnvironment",
             "init_args": {"auto_requeue": True, "requeue_signal": "SIGUSR1"}}
    config = job_config(root, coco8, [signal_at(2, "SIGUSR1"), signal_at(CUT, marker=marker)])
    port = free_port()
    cmd = fit_cmd(config, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                  "--trainer.plugins", yaml.safe_dump(slurm))
    codes = run_processes([(cmd, slurm_env(r, port, bin_dir, scontrol_log)) for r in (0, 1)], tmp_path / "log.txt",
                          marker)
    assert codes == [SIGTERM_EXIT_CODE] * 2, (tmp_path / "log.txt").read_text()[-3000:]
    assert scontrol_log.read_text().splitlines() == ["requeue 4242"]  # rank 0 only, once
    assert weights(root / "hpc_ckpt_1.ckpt")[0] == 2
    assert weights(root / "checkpoints" / "last.ckpt")[0] == CUT


def test_two_nodes_by_one_device_on_loopback_train_to_the_one_node_weights(tmp_path, coco8, uninterrupted):
    # Two ranks all-reduce a + b, which is commutative: the topology cannot change the sum. What differs between
    # launches left alone is the number of intra-op threads Lightning gives each process (cpu_count // local
    # processes), which changes the summation order inside the convolutions; with it fixed the weights agree exactly.
    root = tmp_path / "run"
    config = job_config(root, coco8)
    port = free_port()
    cmd = fit_cmd(config, "--trainer.strategy", "ddp", "--trainer.num_nodes", "2", "--trainer.devices", "1")
    node = {r: job_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(r)) for r in (0, 1)}
    codes = run_processes([(cmd, node[0]), (cmd, node[1])], tmp_path / "log.txt")
    assert codes == [0, 0], (tmp_path / "log.txt").read_text()[-3000:]
    step, got = weights(root / "checkpoints" / "last.ckpt")
    assert step == N_STEPS
    assert_same_weights(got, uninterrupted[1])
