"""A real single-node SLURM for the launcher tests, brought up once per session by local_slurm.sh.

Knobs (environment) for pointing the run-to-completion and preemption tests of test_train.py at
another trainer (the other tests check the launchers' wiring and always use the fake; metrics are
compared without the keys under perf/, time/ and timing/, which measure wall-clock time):
  HPT_TEST_TRAIN_CMD        trainer command, split on spaces (default: the real trainer,
                            python -m hpt_megatron.cli; "fake": tests/slurm/fake_trainer.py)
  HPT_TEST_TRAIN_CONFIG     recipe passed as CONFIG (default: configs/tiny_cpu.yaml; the fake: empty)
  HPT_TEST_TRAIN_OVERRIDES  extra key=value overrides, split on spaces, appended after the launcher's
  HPT_TEST_TRAIN_STEPS      trainer.total_steps of those runs (default 8)
  HPT_TEST_JOB_TIMEOUT      seconds one job may take before the test fails (default 180)
  HPT_SLURM_STATE           where local_slurm.sh keeps the cluster (default /tmp/hpt-slurm)
e.g. HPT_TEST_TRAIN_CMD=fake pytest -m slurm   (the launchers alone, with the stand-in trainer)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SLURM_SCRIPTS = ROOT / "scripts" / "slurm"
FAKE_TRAINER = f"{sys.executable} {HERE / 'fake_trainer.py'}"
JOB_TIMEOUT = float(os.environ.get("HPT_TEST_JOB_TIMEOUT", 180))
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)


@dataclass
class Slurm:
    """Client side of the local cluster; remembers the jobs it submitted so they can be cancelled."""

    node: str
    fake_gpus: int
    jobs: list[str] = field(default_factory=list)

    def sbatch(self, script: Path, *args: str, options: list[str], env: dict, cwd: Path) -> str:
        """Submit from cwd with the script path relative to it: no launcher may rely on either."""
        rel = os.path.relpath(script, cwd)
        r = run(["sbatch", "--parsable", *options, rel, *args], env=env, cwd=cwd)
        assert r.returncode == 0, f"sbatch failed: {r.stderr}"
        job = r.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict[str, str]:
        r = run(["scontrol", "show", "job", "-o", job])
        assert r.returncode == 0, f"scontrol show job {job}: {r.stderr}"
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait(self, job: str, timeout: float = JOB_TIMEOUT, log: Path | None = None) -> dict[str, str]:
        """Poll until the job reaches a final state (a requeued job passes through PENDING again)."""
        deadline = time.monotonic() + timeout
        while (info := self.job(job))["JobState"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                tail = log.read_text()[-3000:] if log and log.exists() else ""
                pytest.fail(f"job {job} still {info['JobState']} after {timeout:.0f}s; log:\n{tail}")
            time.sleep(0.5)
        return info

    def steps(self, job: str) -> dict[str, str]:
        """{step name: step id} of a running job."""
        r = run(["squeue", "-h", "-s", "-j", job, "-o", "%i %j"])
        return {name: sid for sid, name in (ln.split() for ln in r.stdout.splitlines())}

    def cancel_all(self) -> None:
        if self.jobs:
            run(["scancel", *self.jobs])
        self.jobs.clear()


@pytest.fixture(scope="session")
def slurm_cluster():
    """Bring SLURM up (installing it if needed); fail, never skip, when that is impossible."""
    script = HERE / "local_slurm.sh"
    env = {**os.environ, "HPT_SLURM_STATE": os.environ.get("HPT_SLURM_STATE", "/tmp/hpt-slurm")}
    env.setdefault("HPT_SLURM_FAKE_GPUS", "2")
    try:
        r = run(["bash", str(script), "up"], env=env, timeout=900)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"local_slurm.sh up timed out: {e}")
    if r.returncode != 0:
        pytest.fail(f"could not bring SLURM up (local_slurm.sh up, exit {r.returncode}):\n{r.stderr}")
    conf = re.search(r"export SLURM_CONF=(\S+)", r.stdout).group(1)
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield Slurm(node=run(["hostname", "-s"]).stdout.strip(), fake_gpus=int(env["HPT_SLURM_FAKE_GPUS"]))
    finally:
        down = run(["bash", str(script), "down"], env=env, timeout=300)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        assert down.returncode == 0, f"local_slurm.sh down failed:\n{down.stderr}"


@pytest.fixture
def slurm(slurm_cluster):
    """The cluster, with every job this test submitted cancelled afterwards, pass or fail."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


@pytest.fixture
def ray_tmpdir():
    d = make_ray_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_ray_tmpdir() -> str:
    """A short Ray temp dir: Ray's socket paths must stay under 107 bytes."""
    return tempfile.mkdtemp(prefix="hpt-ray-", dir="/tmp")


def job_env(run_dir: Path, ray_tmpdir: str, **extra: str) -> dict[str, str]:
    """The environment a job inherits from its submitter: this interpreter's bin dir first (ray,
    python), the fake trainer, short Ray timeouts; no HPT_ROOT, so the scripts must find the repo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HPT_", "RAY_"))}
    env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        RUN_DIR=str(run_dir),
        HPT_TRAIN_CMD=FAKE_TRAINER,
        HPT_FAKE_STEP_SECONDS="0.2",
        HPT_RAY_TMPDIR=ray_tmpdir,
        HPT_RAY_POLL="1",
        HPT_RAY_STOP_TIMEOUT="10",
        HPT_RAY_START_TIMEOUT="120",
        HPT_RAY_EXTRA_ARGS="--object-store-memory=100000000",
    )
    env.update(extra)
    return env


def ray_processes_left(ray_tmpdir: str, timeout: float = 15) -> list[str]:
    """Command lines of processes still using this job's Ray temp dir, after a grace period."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if ray_tmpdir in cmdline and state != "Z":
                left.append(f"{proc.name}: {cmdline[:200]}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)
