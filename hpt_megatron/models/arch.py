"""Model architectures as data: Hugging Face ``config.json`` -> :class:`ArchConfig`.

Adding a decoder that fits Megatron's GPTModel (pre-norm, RMSNorm, RoPE, SwiGLU, GQA) is one entry in
``ARCHITECTURES``; its weight mapping is named by ``ArchSpec.mapping`` (see ``hpt_megatron.convert``).
Nothing here imports megatron, so configs can be validated before any process group exists.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_VOCAB_DIVISOR = 128


@dataclass(frozen=True)
class ArchSpec:
    """What one HF architecture needs from Megatron.

    Attributes:
        qkv_bias: q/k/v projections carry a bias (o_proj and the MLP do not).
        required: ``(config key, value it must have, value when absent)``: configurations the mapping
            does not cover (e.g. sliding-window attention) are refused with the key named.
        mapping: name of the weight-mapping table in ``hpt_megatron.convert.mapping``.
    """

    qkv_bias: bool
    required: tuple[tuple[str, Any, Any], ...] = ()
    mapping: str = "llama"


ARCHITECTURES: dict[str, ArchSpec] = {
    "Qwen2ForCausalLM": ArchSpec(
        qkv_bias=True,
        required=(("hidden_act", "silu", "silu"), ("use_sliding_window", False, False)),
    ),
    "LlamaForCausalLM": ArchSpec(
        qkv_bias=False,
        required=(
            ("hidden_act", "silu", "silu"),
            ("attention_bias", False, False),
            ("mlp_bias", False, False),
        ),
    ),
}


@dataclass(frozen=True)
class ArchConfig:
    """The shape of a decoder-only model, parsed from a HF config.

    ``head_dim`` is Megatron's ``kv_channels``. ``rope_scaling`` holds the HF rope parameters other than
    theta (``rope_type`` plus its fields), or None for plain RoPE. ``hf_config`` is the raw config,
    kept so that export can write ``config.json`` back.
    """

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    rope_scaling: dict | None = None
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def spec(self) -> ArchSpec:
        return ARCHITECTURES[self.architecture]

    def padded_vocab_size(self, tp: int) -> int:
        """Vocab rounded up to a multiple of ``make_vocab_size_divisible_by * tp`` (Megatron's rule)."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("hf_config")
        return out


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def load_hf_config(source: str | Path | Mapping, label: str | None = None) -> tuple[dict, str]:
    """Read a HF config from a dict, a ``config.json`` path or a model directory.

    Returns:
        (config dict, a label naming where it came from, for error messages).
    """
    if isinstance(source, Mapping):
        return dict(source), label or "<config dict>"
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass a HF model directory or its config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f), str(path)


def arch_config_from_hf(
    source: str | Path | Mapping,
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
    label: str | None = None,
) -> ArchConfig:
    """Parse and validate a HF config (file, directory or dict) into an :class:`ArchConfig`.

    ``label`` names a dict's origin in error messages.

    Raises:
        ValueError: unsupported ``architectures`` entry, a missing key, or a setting the mapping does
            not cover; the message names the file and the key.
    """
    cfg, where = load_hf_config(source, label)
    arch = _architecture(cfg, where)
    spec = ARCHITECTURES[arch]
    for key, want, default in spec.required:
        if cfg.get(key, default) != want:
            raise ValueError(f"{where}: {key}={cfg.get(key)!r} is not supported for {arch} (needs {want!r})")
    theta, scaling = _rope(cfg, where)
    heads = _get(cfg, "num_attention_heads", where)
    hidden = _get(cfg, "hidden_size", where)
    return ArchConfig(
        architecture=arch,
        hidden_size=hidden,
        num_layers=_get(cfg, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        ffn_hidden_size=_get(cfg, "intermediate_size", where),
        vocab_size=_get(cfg, "vocab_size", where),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_theta=theta,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=spec.qkv_bias,
        rope_scaling=scaling,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        hf_config=cfg,
    )


def _architecture(cfg: dict, where: str) -> str:
    archs = cfg.get("architectures") or []
    supported = sorted(ARCHITECTURES)
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(
            f"{where}: architectures={archs!r} is not supported; supported: {supported} (exactly one entry)"
        )
    return archs[0]


def _get(cfg: dict, key: str, where: str) -> Any:
    if key not in cfg:
        raise ValueError(f"{where}: missing required key {key!r}")
    return cfg[key]


def _rope(cfg: dict, where: str) -> tuple[float, dict | None]:
    """(theta, scaling) from either the ``rope_parameters`` (transformers>=5) or the older
    ``rope_theta`` + ``rope_scaling`` keys."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    if not params:
        params = dict(cfg.get("rope_scaling") or {})
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"{where}: rope type {rope_type!r} (rope_parameters/rope_scaling) is not supported; "
            f"supported: {sorted(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


# ----------------------------------------------------------------------------------------------
# RoPE inverse frequencies (the table Megatron's RotaryEmbedding gets overwritten with)
# ----------------------------------------------------------------------------------------------


def default_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Plain RoPE: ``1 / theta^(2i/d)``, shape ``[head_dim // 2]``, fp32."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def llama3_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Llama-3.x frequency scaling (factor, low/high_freq_factor, original_max_position_embeddings).

    Low frequencies are divided by ``factor``, high ones kept, the band between interpolated.
    """
    assert scaling is not None
    inv = default_inv_freq(head_dim, theta, None)
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    medium = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(medium, smoothed, out)


ROPE_TYPES: dict[str, Callable[[int, float, dict | None], torch.Tensor]] = {
    "default": default_inv_freq,
    "llama3": llama3_inv_freq,
}


def rope_inv_freq(arch: ArchConfig) -> torch.Tensor:
    """Inverse RoPE frequencies ``[head_dim // 2]`` (fp32) for ``arch``."""
    rope_type = (arch.rope_scaling or {}).get("rope_type", "default")
    return ROPE_TYPES[rope_type](arch.head_dim, arch.rope_theta, arch.rope_scaling)


# ----------------------------------------------------------------------------------------------
# Parallel layout checks (before any process group is created)
# ----------------------------------------------------------------------------------------------


def check_parallel_layout(arch: ArchConfig, tp: int, pp: int, tp_key: str = "tp", pp_key: str = "pp") -> None:
    """Raise ValueError when ``arch`` cannot be split ``tp`` x ``pp`` ways; names the key and the fix.
    ``tp_key`` / ``pp_key`` are the names the caller's user knows (``parallel.tp``, ``--tp``)."""
    if tp < 1 or pp < 1:
        raise ValueError(f"{tp_key}={tp} and {pp_key}={pp} must be >= 1")
    checks = (
        ("num_attention_heads", arch.num_heads, tp, tp_key),
        ("num_key_value_heads", arch.num_kv_heads, tp, tp_key),
        ("intermediate_size", arch.ffn_hidden_size, tp, tp_key),
        ("num_hidden_layers", arch.num_layers, pp, pp_key),
    )
    for key, value, size, name in checks:
        if value % size != 0:
            divisors = [d for d in range(1, value + 1) if value % d == 0]
            raise ValueError(f"{key}={value} is not divisible by {name}={size}; choose {name} in {divisors}")


def stage_layers(arch: ArchConfig, pp: int, pp_rank: int) -> range:
    """Global indices of the decoder layers held by pipeline stage ``pp_rank`` (even split)."""
    per_stage = arch.num_layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)
