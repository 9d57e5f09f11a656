"""The training loop, as Algorithm 1 of the paper:

    for each step:
        prompts  -> n rollouts each (rollout engines)          generate
        rollouts -> rewards (verifier)                          score
        rewards  -> per-prompt routing (HPT gate)               route
        routing  -> one batch of RL / off-policy / SFT rows     build_step_batch (advantages here)
        batch    -> pi_old log-probs (when needed)              old_logprobs
        batch    -> mini-batch updates                          update
        actor    -> rollout engines                             sync_weights
        metrics, checkpoint, evaluation

Every preset runs through this same loop; multi-phase runs (SFT then GRPO) switch the algorithm at
phase boundaries. SIGTERM / SIGUSR1 finish the current step, checkpoint, and exit with code 75
(``PREEMPTED``); ``trainer.resume=auto`` continues from the latest checkpoint with the same results
as an uninterrupted run.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hpt_megatron.algo import AlgoConfig, Source, count_rows, mean_metrics, plan_rows
from hpt_megatron.async_rollouts import Rollout, RolloutsAhead
from hpt_megatron.config import Config
from hpt_megatron.observability.metrics import MetricsLogger, print_rank0
from hpt_megatron.observability.timing import StageTimer
from hpt_megatron.rollout import SamplingParams
from hpt_megatron.rollout.base import SEED_STRIDE
from hpt_megatron.train.critic_step import critic_warmup, rollout_values, update_critic
from hpt_megatron.train.step_batch import build_step_batch, mini_batches

PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    data: object  # hpt_megatron.run_setup.RunData
    verifier: object
    cluster: object
    sink: MetricsLogger
    start_step: int = 0
    bad_steps: int = 0
    stop_signal: str | None = None
    last_eval: dict = field(default_factory=dict)
    flops_shape: object = None  # observability.flops.DecoderShape of the actor, for MFU
    peak_flops: float | None = None  # per device; None where unknown (CPU)
    ahead: RolloutsAhead | None = None  # the queued generations (rollout.async_staleness > 0)
    carried: dict[int, Rollout] = field(default_factory=dict)  # a resumed async run's, in sync mode

    def __post_init__(self):
        if self.cfg.rollout.async_staleness and self.ahead is None:
            self.ahead = RolloutsAhead(self, self.cfg.rollout.async_staleness, sampling_params)

    @property
    def total_steps(self) -> int:
        return self.cfg.trainer.run_steps

    def algo_at(self, step: int) -> AlgoConfig:
        end = 0
        for phase in self.cfg.trainer.phases:
            end += phase.steps
            if step < end:
                return phase.algo
        return self.cfg.algo


# ---- one step -------------------------------------------------------------------------------------


def sampling_params(run: Run, n: int, step: int) -> SamplingParams:
    r = run.cfg.rollout
    return SamplingParams(
        n=n,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop=tuple(r.stop),
        seed=run.cfg.trainer.seed * SEED_STRIDE + step,
    )


def rollouts(run: Run, step: int) -> Rollout:
    """The step's prompts and their rollouts: generated now (synchronous), or taken from the queue
    of generations ahead (asynchronous; rollout.async_staleness)."""
    if run.ahead is not None:
        return run.ahead.take(step)
    if step in run.carried:  # generated before the checkpoint this synchronous run resumed from
        return run.carried.pop(step)
    out = Rollout.draw(run, step, version=step)
    if out.n:
        out.completions = run.cluster.generate(out.prompt_ids(run), sampling_params(run, out.n, step))
        run.cluster.sleep_engines()
    return out


def score(run: Run, items, completions) -> torch.Tensor:
    """Binary rewards [G, N] from the verifier's worker pool."""
    n = len(completions[0]) if completions else 0
    if n == 0:
        return torch.zeros(len(items), 0, dtype=torch.float64)
    queries = [
        (c.text, it.example.ground_truth, it.example.data_source)
        for it, cs in zip(items, completions)
        for c in cs
    ]
    results = run.verifier.score(queries)
    return torch.tensor([s.reward for s in results], dtype=torch.float64).view(len(items), n)


def demonstrations(run: Run, items, plan) -> tuple[dict[int, list[int]], dict[int, float]]:
    """Token ids of the demonstrations the plan uses; in-group demonstrations are also scored (their
    reward enters the group's advantage)."""
    needed = {g for g, s in zip(plan.prompt, plan.source) if s != Source.RL}
    ids = {g: run.data.train.demonstration_ids(items[g].index) for g in needed}
    in_group = sorted({g for g, s in zip(plan.prompt, plan.source) if s == Source.OFFPOLICY})
    rewards = {}
    if in_group:
        tok = run.data.tokenizer
        queries = [
            (
                tok.decode(ids[g], skip_special_tokens=True),
                items[g].example.ground_truth,
                items[g].example.data_source,
            )
            for g in in_group
        ]
        rewards = {g: s.reward for g, s in zip(in_group, run.verifier.score(queries))}
    return ids, rewards


def old_logprobs(run: Run, batch) -> None:
    """pi_old for the updates (the actor also measures the rollout-engine mismatch against it)."""
    out = run.cluster.compute_logprobs(batch)
    batch.old_logp_BT = out["logp_BT"].to(batch.loss_mask_BT.dtype)


def behaviour_old_logp(batch) -> None:
    """pi_old := the policy that sampled the rows, on the rollout rows' tokens (the engine's
    log-probs; rollout.async_pi_old=behaviour). Elsewhere pi_old stays the recomputed one, or NaN,
    which the actor reads as its current policy (demonstrations, tokens without an engine log-prob)."""
    rollout_BT = batch.rollout_logp_BT
    given = batch.old_logp_BT if batch.old_logp_BT is not None else torch.full_like(rollout_BT, float("nan"))
    rl_BT = (batch.source_B == int(Source.RL))[:, None] & batch.loss_mask_BT.bool() & ~rollout_BT.isnan()
    batch.old_logp_BT = torch.where(rl_BT, rollout_BT, given)
    batch.old_is_behaviour = True


def update(run: Run, step_batch, num_prompts: int, algo: AlgoConfig) -> dict:
    """ppo_epochs passes over mini-batches of prompts, one optimizer step each."""
    parts, skipped = [], []
    for _ in range(run.cfg.trainer.ppo_epochs):
        for rows in mini_batches(step_batch, num_prompts, run.cfg.trainer.mini_batch_prompts):
            sub = step_batch.batch.select(rows)
            out = run.cluster.train_step(sub, algo, count_rows(algo, sub.source_B, sub.loss_mask_BT))
            parts.append(out["metrics"])
            skipped.append(out["reason"] if out["skipped"] else "")
    metrics = mean_metrics(parts)
    metrics["actor/updates"] = float(len(parts))
    metrics["actor/skipped_updates"] = float(sum(1 for s in skipped if s))
    metrics["actor/nonfinite_updates"] = float(sum(1 for s in skipped if s == "nonfinite"))
    return metrics


def train_step(run: Run, step: int) -> dict:
    cfg, algo = run.cfg, run.algo_at(step)
    timer = StageTimer(nvtx=cfg.profile.nvtx)
    with timer.stage("rollout"):
        ro = rollouts(run, step)
    items, n_roll, completions = run.data.train.batch(ro.indices), ro.n, ro.completions
    prompts = [it.prompt_ids for it in items]
    with timer.stage("reward"):
        rewards = score(run, items, completions)
    with timer.stage("gate"):
        routing = algo.gate.route(rewards)
        plan = plan_rows(routing, n_roll, algo.drop_uniform_groups)
        demos, demo_rewards = demonstrations(run, items, plan)
        values = rollout_values(run, step, algo)  # the critic's, for GAE (PPO); None otherwise
        step_batch = build_step_batch(plan, prompts, completions, demos, rewards, demo_rewards, algo, values)
    metrics = step_metrics(routing, rewards, completions, plan)
    if run.ahead is not None:
        metrics["rollout/staleness"] = float(ro.staleness)
        metrics.update(ro.probe)
    if step_batch is not None:
        batch = step_batch.batch
        metrics["rollout/empty_responses"] = float(step_batch.skipped_empty)
        warmup = critic_warmup(run, step)  # the critic's warm-up steps leave the actor unchanged
        if algo.needs_old_logp and cfg.trainer.updates_per_step > 1 and not warmup:
            # with a single update per step pi_old is the current policy: the actor uses its own
            # forward instead of a separate pass
            with timer.stage("old_logprobs"):
                old_logprobs(run, batch)
        if run.ahead is not None and cfg.rollout.async_pi_old == "behaviour":
            behaviour_old_logp(batch)
        if not warmup:
            with timer.stage("update"):
                metrics.update(update(run, step_batch, len(items), algo))
        if values is not None:
            with timer.stage("critic"):
                metrics.update(update_critic(run, step_batch, values, len(items), algo))
            metrics["critic/warmup"] = float(warmup)
        if step == run.start_step and ro.staleness == 0:
            check_initial_mismatch(run, metrics)
        metrics["perf/train_tokens"] = float(batch.loss_mask_BT.sum())
    with timer.stage("weight_sync"):
        if run.ahead is not None:
            metrics.update(run.ahead.weights_updated(step + 1))
        else:
            metrics.update(run.cluster.sync_weights())
    metrics.update(timer.metrics())
    total = sum(timer.seconds.values())
    metrics["perf/step_s"] = total
    metrics["perf/train_tokens_per_s"] = metrics.get("perf/train_tokens", 0.0) / max(
        timer.seconds.get("update", 0.0), 1e-9
    )
    metrics["perf/generated_tokens_per_s"] = metrics["rollout/generated_tokens"] / max(
        timer.seconds["rollout"], 1e-9
    )
    metrics["perf/samples_per_s"] = len(items) / max(total, 1e-9)
    if step_batch is not None and timer.seconds.get("update"):
        metrics.update(actor_flops_metrics(run, step_batch.batch.lengths_B.tolist(), timer.seconds["update"]))
    return metrics


def check_initial_mismatch(run: Run, metrics: dict) -> None:
    """At the first step the engines serve exactly the actor's weights (the probe passed), so the
    actor's log-probs of the sampled tokens must equal the engines' up to numerics. A larger gap means
    the two compute different distributions (temperature, RoPE, chat template, dtype) and every
    update would be off-policy. The gap is measured in the first update's own pass, so the run stops
    right after that update, before any other."""
    gap = metrics.get("rollout/logp_mismatch_abs")
    tol = run.cluster.probe_tolerance
    if gap is not None and gap > tol:
        raise RuntimeError(
            f"step {run.start_step}: the actor's log-probs of the sampled tokens differ from the rollout "
            f"engine's by {gap:.3g} per token on average (tolerance {tol:g}, rollout.probe_tolerance) "
            "although both hold the same weights: they do not compute the same distribution. Check "
            "rollout.temperature vs top_p/top_k, model.rope_theta overrides and the engine dtype."
        )


def actor_flops_metrics(run: Run, row_lengths: list[int], seconds: float) -> dict:
    """Achieved model TFLOP/s per device during the update stage, and MFU where the device's peak is
    known (observability/flops.py has the formula)."""
    from hpt_megatron.observability.flops import sequence_train_flops

    if run.flops_shape is None:
        return {}
    flops = run.cfg.trainer.ppo_epochs * sum(sequence_train_flops(run.flops_shape, n) for n in row_lengths)
    per_device = flops / seconds / run.cfg.cluster.world_size
    out = {"perf/actor_tflops_per_device": per_device / 1e12}
    if run.peak_flops:
        out["perf/mfu"] = per_device / run.peak_flops
    return out


def step_metrics(routing, rewards, completions, plan) -> dict:
    g = routing.num_prompts
    lengths = [len(c.token_ids) for cs in completions for c in cs]
    truncated = [c.finish_reason == "length" for cs in completions for c in cs]
    m = {
        "hpt/sft_fraction": float((routing.sft_coef_G > 0).sum()) / g,
        "hpt/offpolicy_fraction": float(routing.off_G.sum()) / g,
        "hpt/rl_fraction": float((routing.rl_coef_G > 0).sum()) / g,
        "hpt/uniform_groups": float(routing.uniform_G.sum()),
        "hpt/rows": float(len(plan)),
        "rollout/generated_tokens": float(sum(lengths)),
    }
    if rewards.numel():
        m.update(
            {
                "rollout/accuracy": float((rewards > 0.5).double().mean()),
                "reward/mean": float(rewards.mean()),
                "rollout/response_len": sum(lengths) / len(lengths),
                "rollout/truncated_fraction": sum(truncated) / len(truncated),
                "hpt/P_mean": float(routing.p_G.mean()),
            }
        )
    return m


# ---- evaluation, checkpoints ----------------------------------------------------------------------


def evaluate(run: Run, step: int) -> dict:
    """Accuracy on the validation prompts (eval.* sampling), overall and per data source."""
    data = run.data.val
    if data is None:
        return {}
    e = run.cfg.eval
    params = SamplingParams(
        n=1,
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=e.max_new_tokens,
        seed=run.cfg.trainer.seed + 7919 * step,
    )
    items = data.batch(range(len(data)))
    completions = run.cluster.generate([it.prompt_ids for it in items], params)
    rewards = score(run, items, completions)[:, 0]
    metrics = {"eval/accuracy": float((rewards > 0.5).double().mean())}
    for source in sorted({it.example.data_source for it in items}):
        sel = torch.tensor([it.example.data_source == source for it in items])
        metrics[f"eval/{source}/accuracy"] = float((rewards[sel] > 0.5).double().mean())
    return metrics


def checkpoint_dir(run_dir: Path, step: int, fmt: str = "torch_dist") -> Path:
    """``checkpoints/iter_XXXXXXX`` (torch_dist, Megatron-LM's name) or ``checkpoints/step_XXXXXXXX``."""
    from hpt_megatron.convert.torch_dist import iteration_dir

    root = run_dir / "checkpoints"
    return iteration_dir(root, step) if fmt == "torch_dist" else root / f"step_{step:08d}"


def save_checkpoint(run: Run, step: int) -> Path:
    """Collective save of the actor + the driver's state; then the tracker names it
    (``latest_checkpointed_iteration.txt`` for torch_dist, ``latest`` for safetensors)."""
    fmt = run.cfg.trainer.checkpoint_format
    path = checkpoint_dir(run.run_dir, step, fmt)
    meta = {"step": step, "sampler": run.data.sampler.state_dict(), "bad_steps": run.bad_steps}
    # the generations queued for the next steps (the sampler is past their prompts)
    ahead = (
        run.ahead.state_dict() if run.ahead is not None else [r.state_dict() for r in run.carried.values()]
    )
    if ahead:
        meta["rollouts_ahead"] = ahead
    run.cluster.save(str(path), meta)
    _point_latest(path.parent, path, step, fmt)
    _prune(run.run_dir / "checkpoints", run.cfg.trainer.keep_last)
    return path


def _point_latest(root: Path, path: Path, step: int, fmt: str) -> None:
    from hpt_megatron.convert.torch_dist import write_tracker

    if fmt == "torch_dist":
        write_tracker(root, step)
        return
    latest = root / "latest"
    tmp = latest.with_suffix(".tmp")
    tmp.write_text(path.name + "\n")
    tmp.replace(latest)


def _prune(directory: Path, keep: int) -> None:
    import shutil

    for pattern in ("step_*", "iter_*"):
        steps = sorted(p for p in directory.glob(pattern) if p.is_dir())
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint a tracker names (either format), or None."""
    from hpt_megatron.convert.torch_dist import tracked_checkpoint

    root = run_dir / "checkpoints"
    latest = root / "latest"
    named = [tracked_checkpoint(root), root / latest.read_text().strip() if latest.is_file() else None]
    found = [p for p in named if p is not None and p.is_dir()]
    return max(found, key=_checkpoint_step, default=None)


def _checkpoint_step(path: Path) -> int:
    suffix = path.name.rpartition("_")[2]
    return int(suffix) if suffix.isdigit() else -1


# ---- the run --------------------------------------------------------------------------------------


def install_signal_handlers(run: Run) -> None:
    def request_stop(signum, _frame):
        run.stop_signal = signal.Signals(signum).name

    for sig in STOP_SIGNALS:
        signal.signal(sig, request_stop)


def fit(run: Run) -> int:
    from tqdm import tqdm

    cfg = run.cfg
    window = tuple(cfg.profile.steps) if cfg.profile.steps else ()
    bar = tqdm(
        total=run.total_steps,
        initial=run.start_step,
        desc="hpt",
        disable=not cfg.logging.progress,
        dynamic_ncols=True,
    )
    try:
        return _fit_steps(run, bar, window)
    finally:
        bar.close()
        if run.ahead is not None:
            run.ahead.close()


def _fit_steps(run: Run, bar, window: tuple) -> int:
    cfg = run.cfg
    if cfg.trainer.eval_before_train and run.start_step == 0:
        run.last_eval = evaluate(run, 0)
        run.sink.log(0, run.last_eval)
    for step in range(run.start_step, run.total_steps):
        if window and step == window[0]:
            run.cluster.profile_begin(step)  # each profiled rank starts its own window
        metrics = train_step(run, step)
        if window and step == window[1]:
            for trace in run.cluster.profile_end(step):
                print_rank0(f"profiler trace: {trace}")
        run.bad_steps = run.bad_steps + 1 if metrics.get("actor/nonfinite_updates", 0) else 0
        done = step + 1
        if cfg.trainer.eval_every and (done % cfg.trainer.eval_every == 0 or done == run.total_steps):
            run.last_eval = evaluate(run, done)
            metrics.update(run.last_eval)
        run.sink.log(done, metrics)
        bar.update(1)
        bar.set_postfix(_postfix(metrics, run.last_eval))
        if run.bad_steps >= cfg.trainer.max_bad_steps:
            print_rank0(f"stopping: {run.bad_steps} steps in a row had non-finite losses or gradients")
            return 1
        if run.stop_signal:
            path = save_checkpoint(run, done)
            print_rank0(
                f"\n{run.stop_signal}: checkpoint at {path}; exiting with {PREEMPTED} (resume with --resume auto)"
            )
            return PREEMPTED
        if cfg.trainer.save_every and done % cfg.trainer.save_every == 0 and done < run.total_steps:
            save_checkpoint(run, done)
    return 0


def _postfix(metrics: dict, last_eval: dict) -> dict:
    keys = {"acc": "rollout/accuracy", "sft": "hpt/sft_fraction", "loss": "loss/total"}
    out = {k: f"{metrics[v]:.3f}" for k, v in keys.items() if v in metrics}
    if "eval/accuracy" in last_eval:
        out["eval"] = f"{last_eval['eval/accuracy']:.3f}"
    return out
