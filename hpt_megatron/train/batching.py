"""The actor's batch: rows of token ids with per-token training data, split across data-parallel
ranks and into micro-batches by a token budget.

Shape legend: B rows, L tokens per row (padded), T = L - 1 target positions. Position t of every
per-token tensor refers to predicting token t + 1 from tokens 0..t, so ``loss_mask_BT[i, t] = 1``
exactly when token t + 1 of row i is a response token.

Two micro-batch layouts:
    bucketed  rows sorted by length, grouped while rows x longest <= budget, padded to the longest
    packed    rows concatenated into one sequence while total tokens <= budget (first-fit
              decreasing), attention causal within each row through ``cu_seqlens`` (Megatron's
              ``thd`` format) and RoPE positions restarting per row: no padding FLOPs, no N x N mask
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TrainBatch:
    tokens_BL: Tensor  # long, padded with 0
    lengths_B: Tensor  # real tokens per row
    loss_mask_BT: Tensor  # float, response targets
    source_B: Tensor  # hpt_megatron.algo.Source values
    coef_B: Tensor  # per-row gate coefficient
    advantages: dict[str, Tensor] = field(default_factory=dict)  # term -> [B, T]
    old_logp_BT: Tensor | None = None
    rollout_logp_BT: Tensor | None = None  # log-probs under the sampling engine
    ref_logp_BT: Tensor | None = None
    # old_logp_BT holds the sampling policy's log-probs on rollout tokens (asynchronous rollouts,
    # rollout.async_pi_old=behaviour) and NaN where pi_old is the current policy
    old_is_behaviour: bool = False

    @property
    def num_rows(self) -> int:
        return int(self.tokens_BL.shape[0])

    def select(self, rows: list[int] | Tensor) -> TrainBatch:
        """Rows by index, trimmed to their longest row."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        width = int(self.lengths_B[idx].max()) if len(idx) else 1

        def take(t: Tensor | None, cols: int | None) -> Tensor | None:
            if not isinstance(t, Tensor):
                return t
            t = t[idx]
            return t[:, :cols] if cols is not None else t

        values = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            cols = width if f.name == "tokens_BL" else (width - 1 if f.name.endswith("_BT") else None)
            if f.name == "advantages":
                values[f.name] = {k: take(a, width - 1) for k, a in v.items()}
            else:
                values[f.name] = take(v, cols)
        return TrainBatch(**values)


def build_train_batch(
    rows: list[tuple[list[int], int]],
    source: list[int],
    coef: list[float],
) -> TrainBatch:
    """From (token ids, prompt length) per row: padded tokens and the response-target mask."""
    lengths = [len(t) for t, _ in rows]
    width = max(lengths)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1)
    for i, (ids, prompt_len) in enumerate(rows):
        if not 0 < prompt_len < len(ids):
            raise ValueError(
                f"row {i}: prompt length {prompt_len} must be in [1, {len(ids) - 1}] for {len(ids)} tokens"
            )
        tokens[i, : len(ids)] = torch.as_tensor(ids)
        mask[i, prompt_len - 1 : len(ids) - 1] = 1.0
    return TrainBatch(
        tokens_BL=tokens,
        lengths_B=torch.tensor(lengths),
        loss_mask_BT=mask,
        source_B=torch.as_tensor(source, dtype=torch.long),
        coef_B=torch.as_tensor(coef, dtype=torch.float64),
    )


def split_for_data_parallel(lengths: list[int], dp: int) -> list[list[int]]:
    """Row indices per data-parallel rank with balanced token counts (longest row to the least
    loaded rank). Every rank gets at least one row when there are enough rows."""
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    load = [0] * dp
    parts: list[list[int]] = [[] for _ in range(dp)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(dp), key=lambda r: (load[r], len(parts[r])))
        parts[r].append(i)
        load[r] += lengths[i]
    return [sorted(p) for p in parts]


def micro_batches(lengths: list[int], budget: int, packed: bool) -> list[list[int]]:
    """Group row indices so that each micro-batch costs at most ``budget`` tokens: the sum of
    lengths (packed) or rows x longest (bucketed). A row longer than the budget gets its own.
    Rows are taken longest first; packed rows go to the first micro-batch with room (first-fit
    decreasing), bucketed rows to the current one (a run of similar lengths pads little)."""
    if budget < 1:
        raise ValueError(f"micro-batch token budget must be >= 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return _first_fit(order, lengths, budget) if packed else _next_fit_padded(order, lengths, budget)


def _first_fit(order: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    groups: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        g = next((j for j, load in enumerate(loads) if load + lengths[i] <= budget), None)
        if g is None:
            groups.append([])
            loads.append(0)
            g = len(groups) - 1
        groups[g].append(i)
        loads[g] += lengths[i]
    return groups


def _next_fit_padded(order: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@dataclass
class Packed:
    """Rows concatenated into one sequence [1, N] (Megatron's ``thd`` layout): where each row starts
    and how long it is. No mask: attention and RoPE follow the segment boundaries ``cu_seqlens``."""

    tokens_1N: Tensor
    position_ids_1N: Tensor  # restart at 0 in every row
    cu_seqlens: Tensor  # int32 [B + 1]: row i is tokens cu_seqlens[i] .. cu_seqlens[i + 1] - 1
    starts: list[int]
    lengths: list[int]

    @property
    def max_length(self) -> int:
        return max(self.lengths)


def pack(batch: TrainBatch) -> Packed:
    lengths = batch.lengths_B.tolist()
    tokens = torch.cat([batch.tokens_BL[i, :n] for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.as_tensor(lengths).cumsum(0)
    return Packed(tokens, positions, cu, cu[:-1].tolist(), lengths)


def unpack_targets(values_1N: Tensor, packed: Packed, width: int) -> Tensor:
    """Per-target values of a packed sequence -> [B, width] rows (zero padded). A row of n tokens
    has n - 1 targets; the value at its last token predicts the next row's first token: dropped.
    One gather (a per-row loop would cost a copy per row forward and backward)."""
    starts = torch.as_tensor(packed.starts, device=values_1N.device)[:, None]
    targets = torch.as_tensor(packed.lengths, device=values_1N.device)[:, None] - 1
    cols = torch.arange(width, device=values_1N.device)[None, :]
    valid_BW = cols < targets
    index_BW = torch.where(valid_BW, starts + cols, 0)
    return torch.where(valid_BW, values_1N[0, index_BW], values_1N.new_zeros(()))


def padded_causal_mask(batch: TrainBatch) -> Tensor:
    """[B, 1, L, L] bool, True = masked: causal, and padding keys masked."""
    width = batch.tokens_BL.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    key_ok = torch.arange(width)[None, :] < batch.lengths_B[:, None]
    return ~(causal[None] & key_ok[:, None, :])[:, None]
