"""ray_cluster.sh: fails fast, naming the node, when a Ray srun dies (during the run or at start);
runs the driver through srun when it is not on the head node (an salloc shell on a login node).

This cluster has one node, so the failure tests give Ray a second "node" on the same host: HPT_RAY_NODES
lists this node twice (the launcher's own knob for choosing the Ray nodes). The head and the worker
then run as separate srun steps (named ray-head and ray-worker), exactly as on two nodes; Ray's
per-node ports are left to Ray so the two raylets do not collide.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import FAKE_TRAINER, SLURM_SCRIPTS, job_env, ray_processes_left, run

pytestmark = pytest.mark.slurm

# Same-host head and worker: let Ray pick the per-node ports.
UNPINNED = dict.fromkeys(
    ["HPT_RAY_NODE_MANAGER_PORT", "HPT_RAY_OBJECT_MANAGER_PORT", "HPT_RAY_DASHBOARD_AGENT_PORT",
     "HPT_RAY_RUNTIME_ENV_AGENT_PORT", "HPT_RAY_METRICS_PORT"], "")  # fmt: skip


def submit(slurm, tmp_path, ray_tmpdir, nodes: str):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = job_env(run_dir, ray_tmpdir, HPT_RAY_NODES=nodes, **UNPINNED)
    (tmp_path / "recipe.yaml").write_text("{}\n")
    job = slurm.sbatch(SLURM_SCRIPTS / "train.sbatch", "recipe.yaml", "trainer.total_steps=1000",
                       options=["--nodes=1", "--gres=none", "--time=10", f"--output={log}"],
                       env=env, cwd=tmp_path)  # fmt: skip
    return job, run_dir, log, env


def test_dead_worker_srun_fails_the_job_fast(slurm, tmp_path, ray_tmpdir):
    """While the driver trains, the worker's step is killed (`scancel -s KILL JOB.STEP`): to the
    launcher this is what a crashed node, an OOM-killed raylet or a dead link looks like - its
    worker srun exits. The job must fail within 30 s with the node's name in its log; the driver
    is asked to checkpoint on the way out."""
    job, run_dir, log, env = submit(slurm, tmp_path, ray_tmpdir, f"{slurm.node} {slurm.node}")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.monotonic() < deadline, f"driver never started; log:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)

    attach = run([str(run_dir / "attach.sh"), "ray", "status"], env=env, timeout=60)
    assert attach.returncode == 0 and attach.stdout.count(" node_") == 2, attach.stdout + attach.stderr
    steps = slurm.steps(job)
    assert {"ray-head", "ray-worker"} <= steps.keys(), steps
    killed_at = time.monotonic()
    assert run(["scancel", "-s", "KILL", steps["ray-worker"]]).returncode == 0

    info = slurm.wait(job, timeout=60, log=log)
    elapsed = time.monotonic() - killed_at
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", text
    assert elapsed < 30, f"took {elapsed:.1f}s to notice the dead worker"
    assert f"Ray worker on node {slurm.node} exited" in text
    assert f"exit 1: Ray worker on node {slurm.node} died" in text
    assert (run_dir / "checkpoints" / "latest").exists(), "driver was not stopped gracefully"
    assert not ray_processes_left(ray_tmpdir)


def test_worker_srun_that_cannot_start_fails_the_job(slurm, tmp_path, ray_tmpdir):
    """A worker srun that dies at once (here: a node outside the allocation) stops the bring-up."""
    job, run_dir, log, _ = submit(slurm, tmp_path, ray_tmpdir, f"{slurm.node} nosuchnode")
    info = slurm.wait(job, timeout=120, log=log)
    text = log.read_text()
    assert info["JobState"] == "FAILED", text
    assert "Ray worker on node nosuchnode exited" in text
    assert not (run_dir / "metrics.jsonl").exists(), "the driver must not start"
    assert not ray_processes_left(ray_tmpdir)


def test_salloc_shell_off_the_head_runs_the_driver_through_srun(slurm, tmp_path, ray_tmpdir):
    """From an salloc shell on a login node (SLURMD_NODENAME names no node of the allocation) the
    launcher asks the head for its address and starts the driver with srun; SIGUSR1 to the
    launcher still reaches the driver through srun, and its exit code 75 comes back."""
    run_dir = tmp_path / "run"
    env = job_env(run_dir, ray_tmpdir, SLURMD_NODENAME="login-node", HPT_FAKE_STEP_SECONDS="0.5")
    (tmp_path / "recipe.yaml").write_text("{}\n")
    driver = [
        *FAKE_TRAINER.split(),
        "recipe.yaml",
        f"trainer.output_dir={run_dir}",
        "trainer.total_steps=1000",
    ]
    cmd = [
        "salloc",
        "--nodes=1",
        "--gres=none",
        "--time=5",
        "bash",
        str(SLURM_SCRIPTS / "ray_cluster.sh"),
        *driver,
    ]
    salloc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().strip()):
            assert salloc.poll() is None and time.monotonic() < deadline, salloc.communicate(timeout=30)[0]
            time.sleep(0.2)
        [launcher] = Path(f"/proc/{salloc.pid}/task/{salloc.pid}/children").read_text().split()
        os.kill(int(launcher), signal.SIGUSR1)
        out = salloc.communicate(timeout=60)[0]
    finally:
        if salloc.poll() is None:
            salloc.kill()
    assert salloc.returncode == 75, out
    assert "through srun" in out and "driver exited with code 75" in out
    assert (run_dir / "checkpoints" / "latest").exists()
    assert not ray_processes_left(ray_tmpdir)
