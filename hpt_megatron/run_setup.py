"""Building and closing a training run: run directory, data, verifier, workers, resume; and at
the end the final checkpoint (Megatron and Hugging Face formats), plots and a one-screen summary."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from hpt_megatron.config import Config
from hpt_megatron.observability.metrics import MetricsLogger, read_jsonl, truncate_jsonl


@dataclass
class RunData:
    tokenizer: object
    train: object  # hpt_megatron.data.PromptDataset
    val: object | None
    sampler: object  # hpt_megatron.data.PromptSampler


def needs_demonstrations(cfg: Config) -> bool:
    from hpt_megatron.algo import Source

    return any(s != Source.RL for a in cfg.algos for s in a.gate.sources)


def materialize_synthetic(cfg: Config, run_dir: Path) -> Config:
    """Write the synthetic task's parquet files and tokenizer under ``run_dir`` (reused when the
    same settings made them before) and point the config at them."""
    import dataclasses

    from hpt_megatron.data.synthetic import Difficulty, write_dataset
    from hpt_megatron.data.tokenizer import save_tokenizer

    syn = cfg.data.synthetic
    if syn is None:
        return cfg
    out = run_dir / "data"
    stamp = json.dumps(dataclasses.asdict(syn), sort_keys=True)
    files = {"train": out / "train.parquet", "val": out / "val.parquet"}
    settings = out / "settings.json"
    if not all(f.exists() for f in files.values()) or not settings.exists() or settings.read_text() != stamp:
        difficulty = Difficulty(
            min_steps=syn.min_steps,
            max_steps=syn.max_steps,
            max_start=syn.max_start,
            max_operand=syn.max_operand,
            max_value=syn.max_value,
        )
        files = write_dataset(out, train=syn.train, val=syn.val, seed=syn.seed, difficulty=difficulty)
        settings.write_text(stamp)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_files=[str(files["train"])]))
    if syn.val:
        cfg.data.val_files = [str(files["val"])]
    if not cfg.model.tokenizer and not cfg.model.path:
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, tokenizer=str(save_tokenizer(run_dir / "tokenizer")))
        )
    return cfg


def load_data(cfg: Config) -> RunData:
    from hpt_megatron.cluster.worker import load_tokenizer
    from hpt_megatron.data import PromptSampler, build_prompt_dataset

    d = cfg.data
    if not d.train_files:
        raise ValueError("data.train_files is empty; list the training parquet/jsonl files")
    tokenizer = load_tokenizer(cfg)
    common = dict(
        tokenizer=tokenizer,
        on_bad_row=d.on_bad_row,
        template=d.template,
        system_prompt=d.system_prompt,
        default_system_prompt=d.default_system_prompt,
        max_prompt_len=d.max_prompt_len,
        on_long_prompt=d.on_overlong_prompt,
        max_response_len=d.max_response_len,
    )
    train = build_prompt_dataset(d.train_files, require_demonstration=needs_demonstrations(cfg), **common)
    val = build_prompt_dataset(d.val_files, **common) if d.val_files else None
    sampler = PromptSampler(
        len(train), batch_size=cfg.trainer.prompts_per_step, seed=cfg.trainer.seed, shuffle=d.shuffle
    )
    return RunData(tokenizer, train, val, sampler)


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.trainer.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def require_checkpoint(cfg: Config) -> None:
    """A run that starts from ``model.path`` needs the checkpoint on disk (validation and the dry
    run fall back to ``model.hf_config``; training cannot)."""
    m = cfg.model
    if m.path and not m.checkpoint_on_disk():
        raise ValueError(
            f"model.path={m.path!r} holds no Hugging Face checkpoint (no config.json): download it with "
            f"`{m.download_hint()}`, or set model.path to your copy"
        )


def setup_run(cfg: Config):
    from hpt_megatron.cluster import make_cluster
    from hpt_megatron.reward import GradeConfig, Verifier
    from hpt_megatron.trainer import Run, latest_checkpoint

    require_checkpoint(cfg)
    run_dir = prepare_run_dir(cfg)
    cfg = materialize_synthetic(cfg, run_dir)
    resume_from = _resume_path(cfg, run_dir, latest_checkpoint)
    if resume_from is None and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()  # a fresh run in an old directory starts a fresh log
    data = load_data(cfg)
    r = cfg.reward
    verifier = Verifier(
        num_workers=r.num_workers,
        timeout_s=r.timeout_s,
        memory_limit_mb=r.memory_limit_mb,
        config=GradeConfig(
            answer_fallback=r.answer_fallback,
            choice_by_letter=r.choice_by_letter,
            max_response_chars=r.max_response_chars,
        ),
    )
    cluster = make_cluster(cfg)
    sink = MetricsLogger(run_dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard)
    run = Run(cfg=cfg, run_dir=run_dir, data=data, verifier=verifier, cluster=cluster, sink=sink)
    run.flops_shape, run.peak_flops = _flops_model(cfg, cluster)
    if resume_from is not None:
        meta = cluster.load(str(resume_from))
        data.sampler.load_state_dict(meta["sampler"])
        run.start_step, run.bad_steps = int(meta["step"]), int(meta.get("bad_steps", 0))
        ahead = meta.get("rollouts_ahead", [])  # generations queued when the checkpoint was taken
        if run.ahead is not None:
            run.ahead.load_state_dict(ahead)
        else:
            from hpt_megatron.async_rollouts import Rollout

            run.carried = {d["step"]: Rollout.from_state_dict(d) for d in ahead}
        truncate_jsonl(run_dir / "metrics.jsonl", run.start_step)
        print(f"resumed from {resume_from} at step {run.start_step}", flush=True)
    return run


def _flops_model(cfg: Config, cluster):
    """The actor's shape for FLOPs, and the peak FLOP/s of the device the workers train on (asked of
    a worker: under Ray the driver may have no GPU); None where unknown, e.g. on CPU."""
    from hpt_megatron.observability.flops import DecoderShape, peak_flops_for

    return DecoderShape.from_arch(cfg.model.arch()), peak_flops_for(cluster.device_name())


def _resume_path(cfg: Config, run_dir: Path, latest_checkpoint) -> Path | None:
    resume = cfg.trainer.resume
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    from hpt_megatron.convert.torch_dist import tracked_checkpoint
    from hpt_megatron.train.checkpoint import detect_format

    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"trainer.resume={resume!r}: no such directory; use 'auto', 'none' or a checkpoint")
    path = tracked_checkpoint(path) or path  # a save directory: the checkpoint its tracker names
    try:
        detect_format(path)
    except ValueError as err:
        raise ValueError(f"trainer.resume={resume!r}: {err}") from None
    return path


def finish(run, seconds: float) -> None:
    """Final checkpoint in Megatron format and as a Hugging Face model, plots, summary."""
    from hpt_megatron.observability.plots import plot_metrics
    from hpt_megatron.trainer import save_checkpoint

    final = save_checkpoint(run, run.total_steps)
    hf_dir = run.run_dir / "hf"
    run.cluster.export_hf(str(hf_dir))
    records = read_jsonl(run.run_dir / "metrics.jsonl") if (run.run_dir / "metrics.jsonl").exists() else []
    plot = plot_metrics(records, run.run_dir / "plots.png")
    summary = summarize(run, records, seconds, final, hf_dir, plot)
    (run.run_dir / "summary.txt").write_text(summary + "\n")
    print("\n" + summary, flush=True)


def summarize(run, records: list[dict], seconds: float, final: Path, hf_dir: Path, plot) -> str:
    def series(key: str) -> list[float]:
        return [r[key] for r in records if r.get(key) is not None]

    acc, sft, ev = series("rollout/accuracy"), series("hpt/sft_fraction"), series("eval/accuracy")
    lines = [
        f"run {run.run_dir}  ({run.total_steps} steps, {seconds / 60:.1f} min)",
        f"  algorithm        {run.cfg.algo.preset}"
        + (f" (+{len(run.cfg.trainer.phases)} phases)" if run.cfg.trainer.phases else ""),
    ]
    if ev:
        lines.append(f"  held-out acc     {ev[0]:.3f} (first eval) -> {ev[-1]:.3f} (last)")
    if acc:
        lines.append(f"  rollout acc      {acc[0]:.3f} -> {acc[-1]:.3f}")
    if sft:
        lines.append(f"  SFT fraction     {sft[0]:.3f} -> {sft[-1]:.3f}")
    lines += [
        f"  checkpoint       {final}",
        f"  hugging face     {hf_dir}",
        f"  metrics          {run.run_dir / 'metrics.jsonl'} (TensorBoard: {run.run_dir / 'tensorboard'})",
    ]
    if plot:
        lines.append(f"  plots            {plot}")
    return "\n".join(lines)


def teardown(run) -> None:
    run.sink.close()
    run.verifier.close()
    run.cluster.shutdown()


def train(cfg: Config) -> int:
    """``hpt-train``: set the run up, fit, write the final outputs, tear down; the exit code."""
    import time

    from hpt_megatron.trainer import fit, install_signal_handlers

    run = setup_run(cfg)
    install_signal_handlers(run)
    start = time.time()
    try:
        code = fit(run)
        if code == 0:
            finish(run, time.time() - start)
        return code
    finally:
        teardown(run)
