"""Build one pipeline stage of a Megatron-Core ``GPTModel`` from an :class:`ArchConfig`.

Typical use (validation happens before any process group exists)::

    arch = arch_config_from_hf("Qwen2.5-1.5B/")
    check_parallel_layout(arch, tp=2, pp=1)
    ctx = init_parallel(tp=2, pp=1)
    model = build_gpt_model(arch, ctx)               # this rank's stage, TP shard
    logits = model(tokens, position_ids, None)       # [b, s, padded_vocab / tp] on the last stage
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hpt_megatron.models.arch import ArchConfig, arch_config_from_hf, check_parallel_layout, rope_inv_freq
from hpt_megatron.models.specs import HAVE_TE, layer_spec, resolve_spec_name

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


@dataclass(frozen=True)
class FP8Options:
    """Transformer Engine FP8 training. ``format=None`` disables FP8.

    Attributes:
        format: ``e4m3`` or ``hybrid`` (e4m3 forward, e5m2 gradients).
        recipe: scaling recipe, ``delayed`` | ``tensorwise`` | ``blockwise`` | ``mxfp8`` (None = delayed).
        param: keep parameters in FP8 (FP8 all-gather).
        first_last_layers_bf16: run the first and last layer in BF16.
    """

    format: str | None = None
    recipe: str | None = None
    param: bool = False
    first_last_layers_bf16: bool = False

    def is_set(self) -> dict[str, Any]:
        """The options that differ from "FP8 off", by name."""
        values = {
            "fp8.format": self.format,
            "fp8.recipe": self.recipe,
            "fp8.param": self.param,
            "fp8.first_last_layers_bf16": self.first_last_layers_bf16,
        }
        return {k: v for k, v in values.items() if v not in (None, False)}


def default_dtype() -> torch.dtype:
    """fp32 on CPU, bf16 on GPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def check_fp8(fp8: FP8Options | None, spec: str) -> dict[str, Any]:
    """Validate FP8 options against the layer spec; return the TransformerConfig fields they set."""
    chosen = (fp8 or FP8Options()).is_set()
    if not chosen:
        return {}
    first = next(iter(chosen))
    if not HAVE_TE:
        raise ValueError(
            f"{first}={chosen[first]!r} needs Transformer Engine, which is not importable here; "
            f"install transformer-engine[pytorch] or remove the fp8 options"
        )
    if spec != "te":
        raise ValueError(f"{first}={chosen[first]!r} needs layer spec 'te' (got {spec!r})")
    if fp8.format not in FP8_FORMATS:
        raise ValueError(f"fp8.format={fp8.format!r} must be one of {FP8_FORMATS} when FP8 options are set")
    recipe = fp8.recipe or "delayed"
    if recipe not in FP8_RECIPES:
        raise ValueError(f"fp8.recipe={recipe!r} must be one of {FP8_RECIPES}")
    return {
        "fp8": fp8.format,
        "fp8_recipe": recipe,
        "fp8_param": fp8.param,
        "first_last_layers_bf16": fp8.first_last_layers_bf16,
    }


def transformer_config(
    arch: ArchConfig,
    tp: int,
    pp: int,
    dtype: torch.dtype | None = None,
    spec: str = "auto",
    fp8: FP8Options | None = None,
    overrides: Mapping[str, Any] | None = None,
):
    """The megatron ``TransformerConfig`` for ``arch`` split ``tp`` x ``pp`` ways.

    ``overrides`` sets any other TransformerConfig field (e.g. ``recompute_granularity``,
    ``sequence_parallel``, ``variable_seq_lengths``).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_parallel_layout(arch, tp, pp)
    spec = resolve_spec_name(spec)
    dtype = dtype or default_dtype()
    on_cpu = not torch.cuda.is_available()
    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=float(arch.hf_config.get("attention_dropout", 0.0)),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=on_cpu,
        # Fused kernels are CUDA-only (and optional); keep them off unless asked for.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    fields.update(check_fp8(fp8, spec))
    fields.update(overrides or {})
    if fields.get("sequence_parallel") and spec != "te":
        raise ValueError(
            "parallel.sequence_parallel needs Transformer Engine layers (Megatron's torch norms cannot "
            "split the sequence): install the gpu extra or turn sequence_parallel off"
        )
    return TransformerConfig(**fields)


def build_gpt_model(
    arch: ArchConfig | str | Path | Mapping,
    ctx,
    spec: str = "auto",
    dtype: torch.dtype | None = None,
    fp8: FP8Options | None = None,
    overrides: Mapping[str, Any] | None = None,
    parallel_output: bool = True,
):
    """This rank's pipeline stage of a GPTModel for ``arch``.

    Args:
        arch: parsed model config, or a HF ``config.json`` path / model directory / dict.
        ctx: the :class:`~hpt_megatron.distributed.ParallelContext` (its tp/pp sizes and stage).
        spec: layer spec, one of ``auto | te | local | sdpa``.
        dtype: parameter dtype (default: fp32 on CPU, bf16 on GPU).
        fp8: Transformer Engine FP8 options (spec ``te`` only).
        overrides: extra TransformerConfig fields.
        parallel_output: keep logits split over TP (``[b, s, padded_vocab / tp]``).

    Returns:
        ``GPTModel`` with ``pre_process`` on the first stage and ``post_process`` on the last; its
        RoPE frequencies follow ``arch`` (including Llama-3 scaling).
    """
    from megatron.core.models.gpt import GPTModel

    if not isinstance(arch, ArchConfig):
        arch = arch_config_from_hf(arch)
    config = transformer_config(arch, ctx.tp_size, ctx.pp_size, dtype, spec, fp8, overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec),
        vocab_size=arch.padded_vocab_size(ctx.tp_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ctx.is_first_stage,
        post_process=ctx.is_last_stage,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
    )
    # Megatron's RotaryEmbedding hard-codes Llama-3 scaling constants; set the frequencies from arch.
    inv_freq = model.rotary_pos_emb.inv_freq
    model.rotary_pos_emb.inv_freq = rope_inv_freq(arch).to(inv_freq.device)
    if model.post_process and not config.sequence_parallel:
        batch_major_output_layer(model.output_layer)
    return model


def batch_major_output_layer(output_layer) -> None:
    """Let the output layer compute logits in [b, s] order, so that GPTModel's final
    ``logits.transpose(0, 1).contiguous()`` is a view instead of a copy of the whole [b, s, V]
    logits (and its backward another): on CPU those copies cost as much as the LM-head matmul.
    The hidden states [s, b, h] are transposed instead, which is V / h times smaller. Not for
    sequence parallelism, where the layer all-gathers its input along the sequence dimension."""

    def hidden_to_batch_major(module, args, kwargs):
        return (args[0].transpose(0, 1).contiguous(), *args[1:]), kwargs

    def logits_to_sequence_major(module, args, output):
        logits, bias = output
        return logits.transpose(0, 1), bias  # a view: [b, s, V] data seen as [s, b, V]

    output_layer.register_forward_pre_hook(hidden_to_batch_major, with_kwargs=True)
    output_layer.register_forward_hook(logits_to_sequence_major)
