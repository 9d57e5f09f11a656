"""train.sbatch on a real SLURM: a run to completion, and a preempted run that requeues and resumes.

Both runs go through the whole path a cluster job takes: sbatch (production #SBATCH lines shrunk by
command-line options) -> batch shell -> ray_cluster.sh (Ray head in an srun step) -> the trainer.
The trainer is the real embedded job (configs/tiny_cpu.yaml, shrunk to a few small steps) unless
HPT_TEST_TRAIN_CMD names another; HPT_TEST_TRAIN_CMD=fake uses tests/slurm/fake_trainer.py (see conftest).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import (
    FAKE_TRAINER,
    JOB_TIMEOUT,
    ROOT,
    SLURM_SCRIPTS,
    job_env,
    make_ray_tmpdir,
    ray_processes_left,
    run,
)

pytestmark = pytest.mark.slurm

# By default the real embedded job (tiny_cpu, shrunk); HPT_TEST_TRAIN_CMD=fake selects the stand-in.
REAL_TRAINER = f"{sys.executable} -m hpt_megatron.cli"
TRAIN_CMD = os.environ.get("HPT_TEST_TRAIN_CMD", REAL_TRAINER)
TRAIN_CMD = FAKE_TRAINER if TRAIN_CMD == "fake" else TRAIN_CMD
USING_FAKE = TRAIN_CMD == FAKE_TRAINER
STEPS = int(os.environ.get("HPT_TEST_TRAIN_STEPS", 8))
SHRUNK_TINY_CPU = (
    "cluster.devices_per_node=1 data.synthetic.train=2000 data.synthetic.val=32 rollout.n=4 "
    "trainer.prompts_per_step=16 trainer.mini_batch_prompts=16 trainer.eval_every=0 "
    "trainer.eval_before_train=false logging.progress=false logging.tensorboard=false reward.num_workers=1"
)


def overrides_for(train_cmd: str) -> list[str]:
    default = "" if train_cmd == FAKE_TRAINER else SHRUNK_TINY_CPU
    return [f"trainer.total_steps={STEPS}", *os.environ.get("HPT_TEST_TRAIN_OVERRIDES", default).split()]


# Wall-clock measurements differ between any two runs; everything else must match exactly.
TIMING_PREFIXES = ("perf/", "time/", "timing/")


def config_for(workdir: Path, train_cmd: str) -> str:
    """The recipe: HPT_TEST_TRAIN_CONFIG (relative to the repo), tiny_cpu for the real trainer, or an
    empty one in the submit dir for the stand-in."""
    if "HPT_TEST_TRAIN_CONFIG" in os.environ:
        return str(ROOT / os.environ["HPT_TEST_TRAIN_CONFIG"])
    if train_cmd != FAKE_TRAINER:
        return str(ROOT / "configs" / "tiny_cpu.yaml")
    (workdir / "recipe.yaml").write_text("# empty recipe: the trainer's defaults\n")
    return "recipe.yaml"  # relative to the submit dir, as a user would write it


def submit_train(slurm, workdir: Path, step_seconds: float, train_cmd: str = TRAIN_CMD):
    """Submit train.sbatch shrunk to this node: 1 node, its 2 fake GPUs. Returns (job, run dir, log,
    Ray temp dir)."""
    run_dir, log, ray_tmp = workdir / "run", workdir / "job.out", make_ray_tmpdir()
    env = job_env(run_dir, ray_tmp, HPT_TRAIN_CMD=train_cmd, HPT_FAKE_STEP_SECONDS=str(step_seconds))
    options = ["--nodes=1", f"--gres=gpu:{slurm.fake_gpus}", "--time=10", f"--output={log}"]
    job = slurm.sbatch(SLURM_SCRIPTS / "train.sbatch", config_for(workdir, train_cmd), *overrides_for(train_cmd),
                       options=options, env=env, cwd=workdir)  # fmt: skip
    return job, run_dir, log, ray_tmp


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    by_step = {r["step"]: r for r in records}
    assert len(by_step) == len(records), "a step was logged twice"
    return {s: {k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for s, r in by_step.items()}


def launches(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "launches.jsonl").read_text().splitlines()]


def finish(slurm, job: str, log: Path, ray_tmp: str) -> dict[str, str]:
    """Wait for the job, then check that it left no Ray process behind."""
    try:
        info = slurm.wait(job, log=log)
        assert not ray_processes_left(ray_tmp), "Ray processes outlived the job"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return info


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory):
    """One uninterrupted run; the reference for the preempted one."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    job, run_dir, log, ray_tmp = submit_train(slurm_cluster, workdir, step_seconds=0.1)
    try:
        info = finish(slurm_cluster, job, log, ray_tmp)
    finally:
        slurm_cluster.cancel_all()
    return info, run_dir, log


def test_train_sbatch_runs_to_completion(uninterrupted, slurm_cluster):
    info, run_dir, log = uninterrupted
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    steps = sorted(metrics_by_step(run_dir))
    assert len(steps) == STEPS
    gpus = slurm_cluster.fake_gpus
    assert f"Ray is up: 1 node(s), 2 CPU(s), {gpus} GPU(s)" in text
    assert (run_dir / "attach.sh").exists() and (run_dir / "ray" / f"head-{slurm_cluster.node}.log").exists()
    if USING_FAKE:
        assert (run_dir / "checkpoints" / "latest").exists()
        assert steps == list(range(1, STEPS + 1))
        [launch] = launches(run_dir)
        assert launch["resume"] == "auto" and launch["start_step"] == 0
        assert launch["overrides"]["trainer.output_dir"] == str(run_dir)
        assert launch["overrides"]["cluster.num_nodes"] == "1"
        assert launch["overrides"]["cluster.devices_per_node"] == str(gpus)
        assert launch["ray_address"].endswith(":6379")


def wait_for_steps(slurm, job: str, run_dir: Path, log: Path, steps: int) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert time.monotonic() < deadline, f"no training progress; log:\n{log.read_text()[-3000:]}"
        assert slurm.job(job)["JobState"] in {"PENDING", "RUNNING"}, log.read_text()[-3000:]
        time.sleep(0.2)


def test_preempted_job_requeues_resumes_and_matches(uninterrupted, slurm, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit): the driver
    checkpoints and exits 75, the script requeues the job, the job resumes from the checkpoint."""
    _, reference_dir, _ = uninterrupted
    job, run_dir, log, ray_tmp = submit_train(slurm, tmp_path, step_seconds=0.5)
    wait_for_steps(slurm, job, run_dir, log, 2)
    r = run(["scancel", "-b", "-s", "USR1", job])
    assert r.returncode == 0, r.stderr

    info = finish(slurm, job, log, ray_tmp)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert info["Restarts"] == "1", text
    assert "preempted at a checkpoint; requeueing job" in text
    assert metrics_by_step(run_dir) == metrics_by_step(reference_dir)
    if USING_FAKE:
        _, second = launches(run_dir)
        assert 2 <= second["start_step"] < STEPS and second["restart_count"] == "1"
        assert (run_dir / "checkpoints" / f"step_{second['start_step']:08d}").is_dir()


def test_cancelled_job_checkpoints_and_stays_cancelled(slurm, tmp_path):
    """A plain scancel sends SIGTERM to every process of the job: the driver checkpoints within
    KillWait and exits 75, but a cancelled job must not requeue itself."""
    job, run_dir, log, ray_tmp = submit_train(slurm, tmp_path, step_seconds=0.5, train_cmd=FAKE_TRAINER)
    wait_for_steps(slurm, job, run_dir, log, 2)
    assert run(["scancel", job]).returncode == 0
    info = finish(slurm, job, log, ray_tmp)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log.read_text()
    assert (run_dir / "checkpoints" / "latest").exists()
