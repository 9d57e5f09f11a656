"""The ``hpt-train --dry-run`` planner: a recipe's layout and a per-GPU memory estimate, without GPUs.

Nothing here creates a process group, imports megatron or builds a model, so a recipe for 8 x 80 GB
can be checked on a laptop before its weights are downloaded (``model.hf_config`` shapes it). The
memory model is :mod:`hpt_megatron.plan.memory`; this module lays out the plan, judges it against
the device, proposes single-key fixes and collects warnings.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpt_megatron.config import Config
from hpt_megatron.models.arch import ArchConfig, check_parallel_layout
from hpt_megatron.plan.memory import (
    GIB,
    MemoryEstimate,
    count_parameters,
    estimate_memory,
    longest_row,
    micro_batch_tokens,
)

# ---- the plan -------------------------------------------------------------------------------------


@dataclass
class Plan:
    recipe: str
    algorithm: str
    steps: int
    arch: ArchConfig
    model_source: str
    weights_on_disk: bool
    gpus: tuple[int, int]  # (nodes, devices per node)
    tp: int
    pp: int
    dp: int
    params_total: int
    memory: MemoryEstimate
    tokens: int
    fits: bool
    verdict: str
    fixes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable form (``hpt-train RECIPE --dry-run --json``); sizes in bytes."""
        m = self.memory
        return {
            "recipe": self.recipe,
            "algorithm": self.algorithm,
            "steps": self.steps,
            "model": {
                "config": self.model_source,
                "weights_on_disk": self.weights_on_disk,
                **self.arch.to_dict(),
            },
            "layout": {
                "nodes": self.gpus[0],
                "devices_per_node": self.gpus[1],
                "world_size": self.gpus[0] * self.gpus[1],
                "tp": self.tp,
                "pp": self.pp,
                "dp": self.dp,
                "layers_per_stage": self.arch.num_layers // self.pp,
            },
            "params_total": self.params_total,
            "micro_batch_tokens": self.tokens,
            "memory": {
                "device": m.device,
                "stages": [asdict(s) for s in m.stages],
                "rollout": m.rollout,
                "kv_cache": m.kv_cache,
                "reserve": m.reserve,
                "training_peak": m.training_peak,
                "generation_peak": m.generation_peak,
                "peak": m.peak,
            },
            "fits": self.fits,
            "verdict": self.verdict,
            "fixes": self.fixes,
            "warnings": self.warnings,
        }


def make_plan(cfg: Config, gpu_mem_gb: float = 80.0, recipe: str = "") -> Plan:
    """Validate ``cfg``'s layout and estimate its memory on devices of ``gpu_mem_gb`` GiB."""
    arch = cfg.model.arch()
    check_parallel_layout(arch, cfg.parallel.tp, cfg.parallel.pp, "parallel.tp", "parallel.pp")
    memory = estimate_memory(cfg, arch, gpu_mem_gb)
    fits, verdict = judge(cfg, memory)
    config_json = cfg.model.config_json()
    weights = cfg.model.checkpoint_on_disk()
    plan = Plan(
        recipe=recipe,
        algorithm=algorithm_name(cfg),
        steps=cfg.trainer.run_steps,
        arch=arch,
        model_source=str(config_json),
        weights_on_disk=weights,
        gpus=(cfg.cluster.num_nodes, cfg.cluster.devices_per_node),
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        dp=cfg.dp,
        params_total=count_parameters(arch),
        memory=memory,
        tokens=micro_batch_tokens(cfg),
        fits=fits,
        verdict=verdict,
        warnings=plan_warnings(cfg, arch),
    )
    if not fits:
        plan.fixes = single_fixes(cfg, arch, gpu_mem_gb)
    return plan


def algorithm_name(cfg: Config) -> str:
    if cfg.trainer.phases:
        return " -> ".join(p.name or p.algo.preset for p in cfg.trainer.phases)
    return cfg.algo.preset


def judge(cfg: Config, m: MemoryEstimate) -> tuple[bool, str]:
    """FITS / DOES NOT FIT, naming the phase and the keys that move it."""
    limit = m.device / GIB
    if m.training_peak > m.device:
        keys = "parallel.tp, parallel.pp, trainer.micro_batch_tokens"
        if not cfg.model.recompute_activations:
            keys += ", model.recompute_activations"
        return (
            False,
            f"DOES NOT FIT: training needs {m.training_peak / GIB:.1f} GiB > {limit:g} GiB; change {keys}",
        )
    if m.generation_peak > m.device:
        return False, (
            f"DOES NOT FIT: generation needs {m.generation_peak / GIB:.1f} GiB > {limit:g} GiB; lower "
            "rollout.gpu_memory_utilization or raise parallel.tp / parallel.pp"
        )
    if (
        cfg.rollout.engine == "vllm"
        and cfg.cluster.colocate
        and m.kv_cache < longest_row(cfg) * m.kv_per_token
    ):
        return False, (
            f"DOES NOT FIT: rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization:g} leaves vLLM "
            f"{m.kv_cache / GIB:.1f} GiB of KV cache, less than one {longest_row(cfg)}-token sequence; raise "
            "rollout.gpu_memory_utilization or rollout.tp"
        )
    return True, f"FITS: peak {m.peak / GIB:.1f} of {limit:g} GiB per GPU"


def _with(cfg: Config, key: str, value: Any) -> Config:
    out = copy.deepcopy(cfg)
    *parents, leaf = key.split(".")
    obj = out
    for name in parents:
        obj = getattr(obj, name)
    setattr(obj, leaf, value)
    return out


def _candidates(cfg: Config, arch: ArchConfig) -> list[tuple[str, Any]]:
    """Single-key changes worth trying, smallest first."""
    world, tp, pp = cfg.cluster.world_size, cfg.parallel.tp, cfg.parallel.pp
    out: list[tuple[str, Any]] = []
    for t in range(tp + 1, world // pp + 1):
        if world % (t * pp) == 0 and _layout_ok(arch, t, pp):
            out.append(("parallel.tp", t))
    for p in range(pp + 1, world // tp + 1):
        if world % (tp * p) == 0 and _layout_ok(arch, tp, p):
            out.append(("parallel.pp", p))
    if not cfg.model.recompute_activations:
        out.append(("model.recompute_activations", True))
    budget = cfg.trainer.micro_batch_tokens // 2
    while budget >= longest_row(cfg):
        out.append(("trainer.micro_batch_tokens", budget))
        budget //= 2
    if cfg.rollout.engine == "vllm" and cfg.cluster.colocate:
        u = round(cfg.rollout.gpu_memory_utilization - 0.05, 2)
        while u >= 0.1:
            out.append(("rollout.gpu_memory_utilization", u))
            u = round(u - 0.05, 2)
    return out


def _layout_ok(arch: ArchConfig, tp: int, pp: int) -> bool:
    try:
        check_parallel_layout(arch, tp, pp)
    except ValueError:
        return False
    return True


def single_fixes(cfg: Config, arch: ArchConfig, gpu_mem_gb: float) -> list[str]:
    """``key=value`` changes that each, alone, make the plan fit (the first per key)."""
    found: dict[str, str] = {}
    for key, value in _candidates(cfg, arch):
        if key in found:
            continue
        trial = _with(cfg, key, value)
        if judge(trial, estimate_memory(trial, arch, gpu_mem_gb))[0]:
            found[key] = f"{key}={str(value).lower() if isinstance(value, bool) else value}"
    return list(found.values())


def plan_warnings(cfg: Config, arch: ArchConfig) -> list[str]:
    """Problems the run would meet that are not about memory, each naming its key."""
    out = []
    if longest_row(cfg) > arch.max_position_embeddings:
        out.append(
            f"data.max_prompt_len + data.max_response_len = {longest_row(cfg)} exceeds the model's context "
            f"{arch.max_position_embeddings}; set model.max_position_embeddings (and model.rope_theta)"
        )
    micro = micro_batches_per_update(cfg)
    if cfg.parallel.pp > 1 and micro < cfg.parallel.pp:
        out.append(
            f"about {micro} micro-batches per update per DP rank < parallel.pp={cfg.parallel.pp}: mostly bubble"
        )
    return out


def missing_files(cfg: Config) -> list[str]:
    """What a real run needs from disk that is not there yet (the dry run does not need it)."""
    out = []
    m = cfg.model
    if m.path and not m.checkpoint_on_disk():
        out.append(f"model.path {m.path}: not downloaded ({m.download_hint()}); planned from {m.hf_config}")
    files = [("data.train_files", f) for f in cfg.data.train_files] + [
        ("data.val_files", f) for f in cfg.data.val_files
    ]
    files += [("eval.files", f) for f in cfg.eval.files]
    out += [f"{key} {f}: not found" for key, f in files if not Path(f).exists()]
    return out


def micro_batches_per_update(cfg: Config) -> int:
    """Most micro-batches one DP rank runs per optimizer update (every row at full length)."""
    rows = cfg.trainer.mini_batch_prompts * rows_per_prompt(cfg)
    return math.ceil(rows * longest_row(cfg) / max(cfg.dp, 1) / micro_batch_tokens(cfg))


def rows_per_prompt(cfg: Config) -> int:
    """Most training rows one prompt can bring, over the run's algorithms: its rollouts, plus a
    demonstration row when the gate samples fewer than n (1 for SFT, n for LUFFY's 1 + (n - 1))."""
    n = cfg.rollout.n
    return max(r if (r := a.gate.rollouts_per_prompt(n)) == n else r + 1 for a in cfg.algos)
