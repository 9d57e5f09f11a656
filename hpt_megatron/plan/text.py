"""The --dry-run plan as text: one screen a person reads before booking 8 GPUs.
The numbers come from :mod:`hpt_megatron.plan`; this module only lays them out."""

from __future__ import annotations

from hpt_megatron.config import Config
from hpt_megatron.plan import Plan, micro_batches_per_update, missing_files, rows_per_prompt
from hpt_megatron.plan.memory import (
    ADAM_MOMENT_BYTES,
    GIB,
    GRAD_BYTES,
    LOGPROB_TEMPS,
    longest_row,
    optimizer_bytes,
    uses_flash_attention,
    weight_bytes,
)


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _weights_state(cfg: Config, plan: Plan) -> str:
    if not cfg.model.path:
        return " (random initialisation)"
    return "" if plan.weights_on_disk else f" ({cfg.model.path} not downloaded yet)"


def _gib(n: float) -> str:
    return f"{n / GIB:7.2f}"


def render_text(plan: Plan, cfg: Config) -> str:
    """The human-readable plan."""
    a, m = plan.arch, plan.memory
    nodes, per_node = plan.gpus
    lines = [
        f"plan      {plan.recipe or '(defaults)'}: {plan.algorithm}, {plan.steps} steps",
        f"model     {a.architecture} shaped by {plan.model_source}" + _weights_state(cfg, plan),
        f"          {a.num_layers} layers, hidden {a.hidden_size}, {a.num_heads} heads / {a.num_kv_heads} kv heads, "
        f"ffn {a.ffn_hidden_size}, vocab {a.vocab_size} (padded {a.padded_vocab_size(plan.tp)} for TP {plan.tp}), "
        f"{'tied' if a.tie_embeddings else 'untied'} embeddings",
        f"          rope_theta {a.rope_theta:g}{' ' + a.rope_scaling['rope_type'] if a.rope_scaling else ''}, "
        f"context {a.max_position_embeddings}",
        f"layout    {nodes} node(s) x {per_node} GPUs = {nodes * per_node}: TP {plan.tp} x PP {plan.pp} x DP {plan.dp}; "
        f"{a.num_layers // plan.pp} layers per PP stage",
        f"params    {_count(plan.params_total)} total; {_count(max(s.params for s in m.stages))} on one GPU "
        "(largest stage)",
    ]
    lines += _batch_lines(cfg, plan)
    lines += _memory_lines(cfg, plan)
    lines.append(plan.verdict)
    if plan.fixes:
        lines.append("          each of these alone fits: " + ", ".join(plan.fixes))
    elif not plan.fits:
        lines.append(
            "          no single change of those keys fits: add GPUs (cluster.num_nodes / devices_per_node)"
        )
    lines += [f"warning   {w}" for w in plan.warnings]
    lines += [f"missing   {w}" for w in missing_files(cfg)]
    return "\n".join(lines)


def _batch_lines(cfg: Config, plan: Plan) -> list[str]:
    t = cfg.trainer
    rows = t.mini_batch_prompts * rows_per_prompt(cfg)
    micro = micro_batches_per_update(cfg)
    return [
        f"batch     {t.prompts_per_step} prompts/step x n {cfg.rollout.n}; {t.updates_per_step} update(s)/step of "
        f"{t.mini_batch_prompts} prompts (<= {rows} rows)",
        f"          rows <= {longest_row(cfg)} tokens (prompt {cfg.data.max_prompt_len} + response "
        f"{cfg.data.max_response_len}); micro-batch budget T = {plan.tokens} tokens; <= {micro} micro-batches "
        "per update per DP rank",
    ]


def _memory_lines(cfg: Config, plan: Plan) -> list[str]:
    m = plan.memory
    s = m.worst
    wb = weight_bytes(cfg)
    rec = cfg.model.recompute_activations
    opt_bytes = optimizer_bytes(1, wb, 1)
    saving = m.distributed_optimizer_saving / GIB
    if cfg.optim.distributed:
        sharding = f"distributed optimizer: 1/{plan.dp} of them per GPU, saves {saving:.2f}"
    else:
        sharding = (
            f"no distributed optimizer (optim.distributed=true would save {saving:.2f} over DP {plan.dp})"
        )
    lines = [
        f"memory    per GPU in GiB (stage {s.stage} of {plan.pp}; device {m.device / GIB:g} GiB)",
        f"  weights      {_gib(s.weights)}   {wb} B/param",
        f"  grads        {_gib(s.grads)}   {GRAD_BYTES} B/param (fp32 main grads)",
        f"  optimizer    {_gib(s.optimizer)}   {opt_bytes} B/param (Adam m, v"
        + (", fp32 master" if opt_bytes > ADAM_MOMENT_BYTES else "")
        + f"); {sharding}",
        f"  activations  {_gib(s.activations)}   T tokens, recompute {'on' if rec else 'off'} "
        f"(recompute {'off' if rec else 'on'}: {s.activations_other_recompute / GIB:.2f}); "
        + ("flash attention" if uses_flash_attention(cfg) else "local spec keeps attention scores"),
        f"  logits       {_gib(s.logits)}   [T, V/TP] logits + grad, {LOGPROB_TEMPS} fp32 chunks",
    ]
    if s.critic:
        lines.append(
            f"  critic       {_gib(s.critic)}   PPO value model: weights + grads + optimizer (replicated over DP)"
        )
    lines += [
        f"  rollout      {_gib(m.rollout)}   {m.rollout_kind}",
        f"  reserve      {_gib(m.reserve)}   CUDA context, NCCL, sleeping engine, fragmentation",
        f"  peak         {_gib(m.training_peak)}   training (resident + activations + logits + reserve)",
        f"  peak         {_gib(m.generation_peak)}   generation (resident + rollout + reserve)",
    ]
    if cfg.rollout.engine == "vllm" and cfg.cluster.colocate and m.kv_cache > 0:
        tokens = m.kv_cache // m.kv_per_token
        lines.append(
            f"  vLLM KV      {_gib(m.kv_cache)}   {tokens / 1e3:.0f}k tokens = {tokens // longest_row(cfg)} full-length "
            f"sequences at once (rollout.tp {cfg.rollout.tp})"
        )
    return lines
