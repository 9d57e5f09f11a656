"""The memory model of the ``--dry-run`` planner (:mod:`hpt_megatron.plan`): pure arithmetic on the
config and the model shape.

Memory model, bytes per GPU. P_s = parameters one GPU of pipeline stage s holds: its L/pp decoder
layers with every matrix divided by TP (norms replicated), plus the vocab-parallel embedding on the
first stage and the output layer and final norm on the last (vocab padded as Megatron pads it).

    weights      P_s x 2      bf16 (4 when the model runs in fp32, 1 with model.fp8_param)
    grads        P_s x 4      Megatron's DDP keeps fp32 main grads (grad_reduce_in_fp32 in train/actor.py)
    optimizer    P_s x 12     Adam moments (2 x 4) + fp32 master weights (4; none for fp32 weights),
                              replicated on every DP rank; with optim.distributed (Megatron's
                              distributed optimizer) each DP rank keeps ceil(P_s / DP) x 12 (its shard of
                              the flattened buffer); the grad buffer above stays whole (it is
                              reduce-scattered in place). The PPO critic keeps the replicated optimizer.
    activations  see :func:`activation_bytes`
    logits       see :func:`logits_bytes`
    rollout      colocated vLLM: gpu_memory_utilization x device memory while it generates; asleep
                 (weights offloaded to host memory, KV cache freed) while the actor trains
    reserve      RESERVE_GIB for the CUDA context, NCCL buffers, the sleeping engine and fragmentation

The actor's weights, grads and optimizer stay on the GPU during generation too, so a step has two
peaks: generation = actor state + rollout + reserve; training = actor state + activations + logits +
reserve. The recipe FITS when both are at most the device memory (``--gpu-mem-gb``, GiB).
"""

from __future__ import annotations

from dataclasses import dataclass

from hpt_megatron.config import Config
from hpt_megatron.models.arch import ArchConfig

GIB = 2**30
RESERVE_GIB = 4.0
# hpt_megatron.train.logprobs keeps a few [chunk, V_local] fp32 temporaries of ~256 MiB each.
LOGPROB_TEMPS = 3
LOGPROB_CHUNK_BYTES = 256 * 2**20
GRAD_BYTES = 4
ADAM_MOMENT_BYTES = 8
MASTER_BYTES = 4


# ---- parameters -----------------------------------------------------------------------------------


def split_layer_parameters(arch: ArchConfig) -> int:
    """Parameters of one decoder layer that TP splits: q/k/v (and their bias), o_proj, SwiGLU's
    gate, up and down projections."""
    qkv = arch.q_size + 2 * arch.kv_size
    bias = qkv if arch.qkv_bias else 0
    return (
        arch.hidden_size * qkv
        + bias
        + arch.q_size * arch.hidden_size
        + 3 * arch.hidden_size * arch.ffn_hidden_size
    )


def layer_parameters(arch: ArchConfig) -> int:
    """One decoder layer: the split matrices plus its two RMSNorm weights."""
    return split_layer_parameters(arch) + 2 * arch.hidden_size


def count_parameters(arch: ArchConfig) -> int:
    """The model's parameter count as Hugging Face reports it (unpadded vocab, a tied output layer
    counted once)."""
    embedding = arch.vocab_size * arch.hidden_size
    output = 0 if arch.tie_embeddings else embedding
    return embedding + arch.num_layers * layer_parameters(arch) + arch.hidden_size + output


def stage_parameters(arch: ArchConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters one GPU of pipeline stage ``stage`` holds. A tied output layer is a second copy
    of the embedding on the last stage when pp > 1 (Megatron keeps the two in sync)."""
    vocab_shard = arch.padded_vocab_size(tp) // tp * arch.hidden_size
    layers = arch.num_layers // pp
    params = layers * (split_layer_parameters(arch) // tp + 2 * arch.hidden_size)
    first, last = stage == 0, stage == pp - 1
    if first:
        params += vocab_shard
    if last:
        params += arch.hidden_size  # final norm
        if not arch.tie_embeddings or not first:
            params += vocab_shard
    return params


def critic_stage_parameters(arch: ArchConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters of the PPO critic on one GPU of ``stage``: the actor's stage without the output
    layer, plus the scalar value head (hidden + 1, replicated) on the last stage."""
    params = stage_parameters(arch, tp, pp, stage)
    if stage == pp - 1:
        if not arch.tie_embeddings or stage != 0:
            params -= arch.padded_vocab_size(tp) // tp * arch.hidden_size
        params += arch.hidden_size + 1
    return params


# ---- activations and logits -----------------------------------------------------------------------


def activation_bytes(
    arch: ArchConfig,
    tokens: int,
    tp: int,
    layers: int,
    in_flight: int,
    recompute: bool,
    sequence_parallel: bool,
    act_bytes: int,
    flash: bool,
    longest: int,
) -> int:
    """Activations a GPU keeps for the backward pass of ``in_flight`` micro-batches of ``tokens`` (T)
    tokens through its ``layers`` (L_s) decoder layers.

    Saved per token and layer without recompute (b bytes per element, t = TP):
        A = b * (r * 4h + (2q + 2kv + 3f) / t)
    4h: the two norms' inputs and outputs, replicated over TP ranks (r = 1) unless sequence parallel
    splits them (r = 1/t); 2q + 2kv: q, k, v and the attention output; 3f: SwiGLU's gate, up and
    their product. h = hidden, q / kv = query / key-value widths, f = MLP width.
        recompute off:  T * L_s * A * m
        recompute on:   T * (L_s * b * r * h * m + A)   (each layer keeps its input; one layer's
                        activations exist again while its backward runs)
    m = micro-batches in flight (pp - stage under 1F1B). Flash attention (TE, SDPA) saves no score
    matrix; the local spec keeps softmax probabilities, b bytes x (T / s) rows x s^2 x n_q / t per
    layer for rows of the longest length s, plus one layer's fp32 scores while it runs.
    """
    h, t = arch.hidden_size, tp
    r = 1.0 / t if sequence_parallel else 1.0
    per_token_layer = act_bytes * (
        r * 4 * h + (2 * arch.q_size + 2 * arch.kv_size + 3 * arch.ffn_hidden_size) / t
    )
    if recompute:
        total = tokens * (layers * act_bytes * r * h * in_flight + per_token_layer)
    else:
        total = tokens * layers * per_token_layer * in_flight
    if not flash:
        scores = (tokens // longest) * longest**2 * arch.num_heads / t
        kept_layers = 1 if recompute else layers * in_flight
        total += scores * (act_bytes * kept_layers + 4)
    return int(total)


def logits_bytes(arch: ArchConfig, tokens: int, tp: int, act_bytes: int) -> int:
    """The last stage's output logits [T, V_pad / t] and their gradient (b bytes each), plus the
    log-prob kernel's fp32 chunk temporaries (LOGPROB_TEMPS x ~256 MiB)."""
    vocab_local = arch.padded_vocab_size(tp) // tp
    chunk = min(LOGPROB_CHUNK_BYTES, tokens * vocab_local * 4)
    return 2 * tokens * vocab_local * act_bytes + LOGPROB_TEMPS * chunk


def kv_bytes_per_token(arch: ArchConfig, engine_tp: int) -> int:
    """vLLM's KV cache per token on one GPU: K and V, every layer, bf16, kv heads split over its TP."""
    return 2 * arch.num_layers * max(arch.num_kv_heads // engine_tp, 1) * arch.head_dim * 2


# ---- the estimate ---------------------------------------------------------------------------------


@dataclass
class StageMemory:
    """Bytes on one GPU of a pipeline stage."""

    stage: int
    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    activations_other_recompute: int  # the same with model.recompute_activations flipped
    logits: int
    critic: int = 0  # the PPO critic's weights, grads and optimizer state (resident like the actor's)

    @property
    def resident(self) -> int:
        return self.weights + self.grads + self.optimizer + self.critic


@dataclass
class MemoryEstimate:
    device: int
    stages: list[StageMemory]
    rollout: int  # while generating
    rollout_kind: str
    kv_cache: int  # bytes left for vLLM's KV cache (rollout minus its weights)
    kv_per_token: int
    reserve: int
    # what the distributed optimizer saves (optim.distributed) or would save on the largest stage
    distributed_optimizer_saving: int

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.resident + s.activations + s.logits)

    @property
    def training_peak(self) -> int:
        return max(s.resident + s.activations + s.logits for s in self.stages) + self.reserve

    @property
    def generation_peak(self) -> int:
        return max(s.resident for s in self.stages) + self.rollout + self.reserve

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.generation_peak)


def weight_bytes(cfg: Config) -> int:
    """Bytes per weight: fp32 only when the recipe asks for it or runs on CPU (dtype auto)."""
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "fp32" if cfg.cluster.device == "cpu" else "bf16"
    if dtype == "fp32":
        return 4
    return 1 if cfg.model.fp8 and cfg.model.fp8_param else 2


def micro_batch_tokens(cfg: Config) -> int:
    """Tokens in the largest micro-batch: the budget, or one row when a row is longer than it."""
    return max(cfg.trainer.micro_batch_tokens, longest_row(cfg))


def longest_row(cfg: Config) -> int:
    return cfg.data.max_prompt_len + cfg.data.max_response_len


def uses_flash_attention(cfg: Config) -> bool:
    """TE and SDPA never materialise the score matrix; ``auto`` is planned as TE (the GPU extra)."""
    return cfg.model.layer_spec != "local"


def estimate_memory(cfg: Config, arch: ArchConfig, device_gib: float) -> MemoryEstimate:
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    wb = weight_bytes(cfg)
    act_b = 4 if wb == 4 else 2
    tokens = micro_batch_tokens(cfg)
    dp = max(cfg.dp, 1)
    shards = dp if cfg.optim.distributed else 1
    stages = []
    for s in range(pp):
        p = stage_parameters(arch, tp, pp, s)
        common = dict(
            arch=arch,
            tokens=tokens,
            tp=tp,
            layers=arch.num_layers // pp,
            in_flight=pp - s,
            sequence_parallel=cfg.parallel.sequence_parallel,
            act_bytes=act_b,
            flash=uses_flash_attention(cfg),
            longest=longest_row(cfg),
        )
        recompute = cfg.model.recompute_activations
        stages.append(
            StageMemory(
                stage=s,
                params=p,
                weights=p * wb,
                grads=p * GRAD_BYTES,
                optimizer=optimizer_bytes(p, wb, shards),
                activations=activation_bytes(recompute=recompute, **common),
                activations_other_recompute=activation_bytes(recompute=not recompute, **common),
                logits=logits_bytes(arch, tokens, tp, act_b) if s == pp - 1 else 0,
                critic=critic_bytes(arch, tp, pp, s, wb) if cfg.critic_enabled else 0,
            )
        )
    device = int(device_gib * GIB)
    rollout, kind, kv = rollout_bytes(cfg, arch, device, wb)
    largest = max(stages, key=lambda st: st.params)
    replicated = optimizer_bytes(largest.params, wb, 1)
    return MemoryEstimate(
        device=device,
        stages=stages,
        rollout=rollout,
        rollout_kind=kind,
        kv_cache=kv,
        kv_per_token=kv_bytes_per_token(arch, cfg.rollout.tp),
        reserve=int(RESERVE_GIB * GIB),
        distributed_optimizer_saving=replicated - optimizer_bytes(largest.params, wb, dp),
    )


def optimizer_bytes(params: int, weight_b: int, shards: int) -> int:
    """Adam moments and (under 16-bit weights) fp32 master weights of ``params`` parameters, of which
    one GPU holds 1 / ``shards`` (the data-parallel size under the distributed optimizer, else 1)."""
    per_param = ADAM_MOMENT_BYTES + (MASTER_BYTES if weight_b != 4 else 0)
    return -(-params // shards) * per_param


def critic_bytes(arch: ArchConfig, tp: int, pp: int, stage: int, weight_b: int) -> int:
    """The critic's resident bytes: the actor's per-parameter weights + grads + optimizer. Its
    activations are not added: its passes run after the actor's, whose logits make the larger peak."""
    params = critic_stage_parameters(arch, tp, pp, stage)
    return params * (weight_b + GRAD_BYTES) + optimizer_bytes(params, weight_b, 1)


def rollout_bytes(cfg: Config, arch: ArchConfig, device: int, weight_b: int) -> tuple[int, str, int]:
    """(bytes the rollout engine holds while generating, a description, bytes left for KV cache).
    vLLM takes gpu_memory_utilization of the device for its weights (1 / rollout.tp of the model) and
    KV cache; the HF engine holds a full copy of the weights (its KV cache is not estimated)."""
    model_bytes = count_parameters(arch) * min(weight_b, 2)
    if not cfg.cluster.colocate:
        return 0, "rollout on separate GPUs (cluster.colocate=false)", 0
    if cfg.rollout.engine == "vllm":
        budget = int(cfg.rollout.gpu_memory_utilization * device)
        weights = model_bytes // cfg.rollout.tp
        kind = f"vLLM {cfg.rollout.gpu_memory_utilization:g} x device while generating; asleep while training"
        return budget, kind, budget - weights
    return model_bytes, "HF engine: a full copy of the weights while generating (KV cache not counted)", 0
