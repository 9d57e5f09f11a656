"""The sbatch wrappers: --help without SLURM, shellcheck, and the convert, eval and profiling paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.slurm.conftest import HERE, SLURM_SCRIPTS, job_env, ray_processes_left, run

SCRIPTS = ["train.sbatch", "eval.sbatch", "convert.sbatch", "ray_cluster.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_works_without_slurm(name, tmp_path):
    """--help from any directory, with no SLURM variables or config: usage, #SBATCH lines, knobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HPT_"))}
    r = run(["bash", str(SLURM_SCRIPTS / name), "--help"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and "Environment knobs" in r.stdout
    if name.endswith(".sbatch"):
        assert "#SBATCH --job-name=" in r.stdout


def test_convert_rejects_an_unknown_direction():
    r = run(["bash", str(SLURM_SCRIPTS / "convert.sbatch"), "hf-to-nowhere"])
    assert r.returncode == 2 and "hf-to-megatron or megatron-to-hf" in r.stderr


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        install = ["apt-get", "install", "-y", "--no-install-recommends", "shellcheck"]
        r = subprocess.run(install, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"shellcheck is missing and could not be installed: {r.stderr[-2000:]}"
    files = [str(SLURM_SCRIPTS / n) for n in SCRIPTS] + [str(HERE / "local_slurm.sh")]
    r = run(["shellcheck", "--shell=bash", *files])
    assert r.returncode == 0, r.stdout


@pytest.mark.slurm
def test_convert_sbatch_passes_its_arguments(slurm, tmp_path, ray_tmpdir):
    log = tmp_path / "job.out"
    env = job_env(tmp_path / "run", ray_tmpdir, HPT_CONVERT_CMD="echo converting:")
    job = slurm.sbatch(SLURM_SCRIPTS / "convert.sbatch", "hf-to-megatron", "--hf", "in dir", "--tp", "2",
                       options=["--cpus-per-task=1", f"--output={log}"], env=env, cwd=tmp_path)  # fmt: skip
    info = slurm.wait(job, log=log)
    assert info["JobState"] == "COMPLETED", log.read_text()
    assert "converting: hf-to-megatron --hf in dir --tp 2" in log.read_text()


def write_tool(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.mark.slurm
def test_eval_sbatch_runs_its_driver_on_a_ray_cluster(slurm, tmp_path, ray_tmpdir):
    log, run_dir = tmp_path / "job.out", tmp_path / "run"
    tool = write_tool(tmp_path / "fake-eval", 'echo "eval args: $* | RAY_ADDRESS=$RAY_ADDRESS"\n')
    env = job_env(run_dir, ray_tmpdir, HPT_EVAL_CMD=str(tool))
    job = slurm.sbatch(SLURM_SCRIPTS / "eval.sbatch", "--model", "ckpt", "--k", "8",
                       options=["--nodes=1", "--gres=none", "--time=5", f"--output={log}"], env=env, cwd=tmp_path)  # fmt: skip
    info = slurm.wait(job, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "eval args: --model ckpt --k 8 | RAY_ADDRESS=" in text and ":6379" in text
    assert (run_dir / "attach.sh").exists()
    assert not ray_processes_left(ray_tmpdir)


@pytest.mark.slurm
def test_profile_mode_fails_clearly_without_nsys(slurm, tmp_path, ray_tmpdir):
    log = tmp_path / "job.out"
    env = job_env(tmp_path / "run", ray_tmpdir, PROFILE="1")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not Path(p, "nsys").exists())
    (tmp_path / "recipe.yaml").write_text("{}\n")
    job = slurm.sbatch(SLURM_SCRIPTS / "train.sbatch", "recipe.yaml",
                       options=["--nodes=1", "--gres=none", "--time=5", f"--output={log}"], env=env, cwd=tmp_path)  # fmt: skip
    info = slurm.wait(job, timeout=60, log=log)
    text = log.read_text()
    assert info["JobState"] == "FAILED", text
    assert "PROFILE=1 needs Nsight Systems: 'nsys' is not on PATH" in text
    assert "ray_cluster" not in text, "Ray must not start when the profiler is missing"


@pytest.mark.slurm
def test_profile_mode_wraps_the_driver_in_nsys(slurm, tmp_path, ray_tmpdir):
    """A stand-in nsys records its arguments and runs the command it wraps."""
    log, run_dir, bin_dir = tmp_path / "job.out", tmp_path / "run", tmp_path / "bin"
    bin_dir.mkdir()
    write_tool(bin_dir / "nsys", f"""printf '%s\\n' "$@" > {tmp_path / 'nsys.args'}
shift  # profile
while [[ $1 == -* ]]; do [[ $1 == -o ]] && shift; shift; done
exec "$@"
""")  # fmt: skip
    env = job_env(run_dir, ray_tmpdir, PROFILE="1", PROFILE_STEPS="2,3", PROFILE_RANKS="0,1")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    (tmp_path / "recipe.yaml").write_text("{}\n")
    job = slurm.sbatch(SLURM_SCRIPTS / "train.sbatch", "recipe.yaml", "trainer.total_steps=4",
                       options=["--nodes=1", "--gres=none", "--time=5", f"--output={log}"], env=env, cwd=tmp_path)  # fmt: skip
    info = slurm.wait(job, log=log)
    assert info["JobState"] == "COMPLETED", log.read_text()
    args = (tmp_path / "nsys.args").read_text().splitlines()
    assert args[0] == "profile"
    assert "--capture-range=cudaProfilerApi" in args and "--capture-range-end=stop" in args
    assert args[args.index("-o") + 1] == f"{run_dir}/nsys/driver-%h-%p"
    [launch] = [json.loads(ln) for ln in (run_dir / "launches.jsonl").read_text().splitlines()]
    assert launch["overrides"]["profile.steps"] == "[2,3]"
    assert launch["overrides"]["profile.ranks"] == "[0,1]"
    assert not ray_processes_left(ray_tmpdir)
