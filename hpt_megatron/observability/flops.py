"""Model FLOPs of a decoder-only transformer with grouped-query attention and a SwiGLU MLP.

Per token and per layer, forward pass (a matmul of [m, k] x [k, n] costs 2 m k n):
    q projection        2 * h * (n_q * d)
    k and v projections 2 * 2 * h * (n_kv * d)
    output projection   2 * (n_q * d) * h
    attention scores    2 * n_q * d * c        (q . k over c attended keys)
    attention values    2 * n_q * d * c        (softmax . v)
    SwiGLU MLP          2 * 3 * h * f          (gate, up: h -> f; down: f -> h)
plus the output layer 2 * h * V once per token. h = hidden size, d = head dim, n_q / n_kv = query /
key-value heads, f = MLP size, V = vocabulary. With causal attention a token at position i attends
to i + 1 keys, so a sequence of length s averages c = (s + 1) / 2.
A training step costs 3x the forward FLOPs (backward = 2x forward); activation recomputation adds
another forward, which MFU conventionally does NOT count (that would be hardware FLOPs utilisation).
Norms, rotary embeddings, softmax and the embedding lookup are ignored (well under 1%).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    head_dim: int | None = None

    @classmethod
    def from_arch(cls, arch) -> DecoderShape:
        """From a ``models.ArchConfig``."""
        return cls(
            hidden=arch.hidden_size,
            layers=arch.num_layers,
            heads=arch.num_heads,
            kv_heads=arch.num_kv_heads,
            ffn=arch.ffn_hidden_size,
            vocab=arch.vocab_size,
            head_dim=arch.head_dim,
        )

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads


def forward_flops_per_token(shape: DecoderShape, context: float) -> float:
    """Forward FLOPs for one token that attends to ``context`` keys."""
    h, d, nq, nkv = shape.hidden, shape.d, shape.heads, shape.kv_heads
    projections = 2 * h * nq * d + 4 * h * nkv * d + 2 * nq * d * h
    attention = 4 * nq * d * context
    mlp = 6 * h * shape.ffn
    return shape.layers * (projections + attention + mlp) + 2 * h * shape.vocab


def sequence_train_flops(shape: DecoderShape, seq_len: int) -> float:
    """Training FLOPs (forward + backward) of one causal sequence of ``seq_len`` tokens."""
    return 3.0 * seq_len * forward_flops_per_token(shape, (seq_len + 1) / 2)


def mfu(shape: DecoderShape, seq_lens: list[int], seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of a training step over sequences of the given lengths."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError("seconds and peak_flops must be > 0")
    return sum(sequence_train_flops(shape, s) for s in seq_lens) / (seconds * peak_flops)


# Dense bf16 peak FLOP/s per device (vendor numbers, no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A800": 312e12}


def peak_flops_for(device_name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key in device_name.upper():
            return value
    return None
