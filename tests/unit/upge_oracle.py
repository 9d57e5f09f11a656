"""Closed-form Table 1 gradients, written independently of hpt_megatron.algo.

Everything here is plain Python over floats, one row at a time, so it shares no code with the
estimator. ``expected_grads`` returns d loss / d logp[i][t] and d loss / d entropy[i][t] for a
batch described by lists, for each preset, from the formulas of the paper / the released code / verl
(dual clip c = 3 for the verl-family presets, whitened token returns for REINFORCE++, raw reward for
a GRPO group of one):

    d loss / d log pi_t = -c * coef_row * 1_stable * A * f'(pi) * pi / pi_ref   (per token)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, stdev

GAMMA_SHAPE = 0.1
RELEASED = 8192.0
DUAL_CLIP = 3.0  # verl's clip_ratio_c


@dataclass
class Row:
    source: str  # rl | off | sft
    group: int
    reward: float
    coef: float
    logp: list[float]
    old: list[float]
    entropy: list[float]
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.logp)


# ---- advantages -------------------------------------------------------------------------------


def group_members(rows: list[Row], scored) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if scored(r):
            groups.setdefault(r.group, []).append(i)
    return groups


def grpo(rows: list[Row], std: bool) -> dict[int, float]:
    """verl's rule: a group of one has mean 0 and std 1."""
    out = {}
    for members in group_members(rows, lambda r: r.source != "sft").values():
        rs = [rows[i].reward for i in members]
        mu, sd = (mean(rs), stdev(rs)) if len(rs) > 1 else (0.0, 1.0)
        for i in members:
            a = rows[i].reward - mu
            out[i] = a / (sd + 1e-6) if std else a
    return out


def rloo(rows: list[Row]) -> dict[int, float]:
    out = {}
    for members in group_members(rows, lambda r: r.source == "rl").values():
        for i in members:
            others = [rows[j].reward for j in members if j != i]
            out[i] = rows[i].reward - mean(others)
    return out


def token_whitened_returns(rows: list[Row], gamma: float = 1.0) -> dict[int, list[float]]:
    """REINFORCE++ as verl: discounted returns of the outcome reward (on the last token), whitened
    with the mean and unbiased variance over every token of every rollout, ``/ sqrt(var + 1e-8)``."""
    returns = {
        i: [r.reward * gamma ** (r.n - 1 - t) for t in range(r.n)]
        for i, r in enumerate(rows)
        if r.source == "rl"
    }
    flat = [g for rs in returns.values() for g in rs]
    mu = sum(flat) / len(flat)
    var = sum((g - mu) ** 2 for g in flat) / (len(flat) - 1)
    return {i: [(g - mu) / math.sqrt(var + 1e-8) for g in rs] for i, rs in returns.items()}


def gae_whitened(rows: list[Row], gamma: float, lam: float) -> dict[int, list[float]]:
    raw = {}
    for i, r in enumerate(rows):
        if r.source != "rl":
            continue
        adv = [0.0] * r.n
        nxt_a, nxt_v = 0.0, 0.0
        for t in reversed(range(r.n)):
            reward = r.reward if t == r.n - 1 else 0.0
            delta = reward + gamma * nxt_v - r.values[t]
            nxt_a = delta + gamma * lam * nxt_a
            nxt_v = r.values[t]
            adv[t] = nxt_a
        raw[i] = adv
    flat = [a for adv in raw.values() for a in adv]
    mu, sd = mean(flat), stdev(flat)
    return {i: [(a - mu) / (sd + 1e-8) for a in adv] for i, adv in raw.items()}


# ---- per-token pieces ---------------------------------------------------------------------------


def ratio(r: Row, t: int) -> float:
    return math.exp(r.logp[t] - r.old[t])


def ppo_keep(a: float, rt: float, eps_low: float, eps_high: float, dual: float | None = None) -> float:
    """d/d r of the (dual-)clipped loss, over -A: PPO's max(-A r, -A clip(r)) passes the gradient
    unless the clip won; dual clip caps a negative-advantage loss at -A c, flat once r > c."""
    clipped = (a > 0 and rt > 1 + eps_high) or (a < 0 and rt < 1 - eps_low)
    capped = dual is not None and a < 0 and rt > dual
    return 0.0 if clipped or capped else 1.0


def shaped_dlogp(logp: float) -> float:
    """d f(pi) / d log pi for f(x) = x / (x + gamma): f'(pi) * pi."""
    p = math.exp(logp)
    return GAMMA_SHAPE * p / (p + GAMMA_SHAPE) ** 2


def mean_entropy(r: Row) -> float:
    return sum(r.entropy) / r.n


def tokens(rows: list[Row], sources: tuple[str, ...]) -> int:
    return sum(r.n for r in rows if r.source in sources)


def seqs(rows: list[Row], sources: tuple[str, ...]) -> int:
    return sum(1 for r in rows if r.source in sources)


# ---- presets ------------------------------------------------------------------------------------


def expected_grads(name: str, rows: list[Row]) -> tuple[list[list[float]], list[list[float]]]:
    g_logp = [[0.0] * r.n for r in rows]
    g_ent = [[0.0] * r.n for r in rows]
    ent_coef = ORACLES[name](rows, g_logp)
    n_all = sum(r.n for r in rows)
    for i, r in enumerate(rows):
        for t in range(r.n):
            g_ent[i][t] = -ent_coef / n_all
    return g_logp, g_ent


def _sft(rows, g, sources=("sft",), weight=None):
    n = tokens(rows, sources)
    for i, r in enumerate(rows):
        if r.source in sources:
            w = weight(r) if weight else 1.0
            for t in range(r.n):
                g[i][t] += -r.coef * w / n


def _clipped_rl(rows, g, adv, scale, eps_low=0.2, eps_high=0.2, dual=DUAL_CLIP):
    """-A * keep * ratio, each token scaled by scale(row); ``dual`` None = no dual clip."""
    for i, r in enumerate(rows):
        if r.source != "rl":
            continue
        for t in range(r.n):
            a = adv[i][t] if isinstance(adv[i], list) else adv[i]
            rt = ratio(r, t)
            g[i][t] += -r.coef * a * ppo_keep(a, rt, eps_low, eps_high, dual) * rt * scale(r)


def sft(rows, g):
    _sft(rows, g)
    return 0.0


def reinforce(rows, g):
    n = tokens(rows, ("rl",))
    for i, r in enumerate(rows):
        if r.source == "rl":
            a = 1.0 if r.reward > 0.5 else -1.0
            for t in range(r.n):
                g[i][t] += -r.coef * a / n
    return 0.0


def ppo(rows, g):
    n = tokens(rows, ("rl",))
    _clipped_rl(rows, g, gae_whitened(rows, 1.0, 0.95), lambda r: 1.0 / n)
    return 0.0


def grpo_preset(rows, g):
    n = seqs(rows, ("rl",))
    _clipped_rl(rows, g, grpo(rows, std=True), lambda r: 1.0 / (r.n * n))
    return 0.0


def dr_grpo(rows, g):
    n = seqs(rows, ("rl",))
    _clipped_rl(rows, g, grpo(rows, std=False), lambda r: 1.0 / (n * RELEASED))
    return 0.0


def dapo(rows, g):
    n = tokens(rows, ("rl",))
    _clipped_rl(rows, g, grpo(rows, std=True), lambda r: 1.0 / n, eps_low=0.2, eps_high=0.28)
    return 0.0


def rloo_preset(rows, g):
    n = seqs(rows, ("rl",))
    adv = rloo(rows)
    for i, r in enumerate(rows):
        if r.source == "rl":
            for t in range(r.n):
                g[i][t] += -r.coef * adv[i] / n
    return 0.0


def reinforce_pp(rows, g):
    n = tokens(rows, ("rl",))
    _clipped_rl(rows, g, token_whitened_returns(rows), lambda r: 1.0 / n)
    return 0.0


def cispo(rows, g):
    n = tokens(rows, ("rl",))
    adv = grpo(rows, std=True)
    for i, r in enumerate(rows):
        if r.source == "rl":
            for t in range(r.n):
                g[i][t] += -r.coef * adv[i] * min(ratio(r, t), 1.28) / n
    return 0.0


def gspo(rows, g):
    n = seqs(rows, ("rl",))
    adv = grpo(rows, std=True)
    for i, r in enumerate(rows):
        if r.source != "rl":
            continue
        s = math.exp(sum(r.logp[t] - r.old[t] for t in range(r.n)) / r.n)
        keep = ppo_keep(adv[i], s, 3e-4, 4e-4)
        for t in range(r.n):
            g[i][t] += -r.coef * adv[i] * keep * s / (r.n * n)
    return 0.0


def _luffy_off(rows, g, adv):
    for i, r in enumerate(rows):
        if r.source == "offpolicy":
            for t in range(r.n):
                g[i][t] += -r.coef * adv[i] * shaped_dlogp(r.logp[t]) / RELEASED


def luffy(rows, g):
    adv = grpo(rows, std=False)  # one group over the demonstration and the rollouts
    for i, r in enumerate(rows):
        if r.source == "rl":
            for t in range(r.n):
                g[i][t] += -r.coef * adv[i] * ratio(r, t) / RELEASED
    _luffy_off(rows, g, adv)
    return 0.001


def srft(rows, g):
    for i, r in enumerate(rows):
        if r.source == "rl":
            correct = r.reward > 0.5
            a = 0.1 * math.exp(mean_entropy(r)) if correct else -1.0
            for t in range(r.n):
                g[i][t] += -r.coef * a / RELEASED
    _luffy_off(rows, g, grpo(rows, std=False))
    _sft(rows, g, sources=("offpolicy",), weight=lambda r: 0.5 * math.exp(-mean_entropy(r)))
    return 0.001


def hpt(rows, g):
    n = tokens(rows, ("rl",))
    _clipped_rl(rows, g, grpo(rows, std=True), lambda r: 1.0 / n, dual=None)
    _sft(rows, g)
    return 0.0


def hpt_official(rows, g):
    adv = grpo(rows, std=False)
    for i, r in enumerate(rows):
        if r.source == "rl":
            for t in range(r.n):
                g[i][t] += -r.coef * adv[i] * ratio(r, t) / RELEASED
    _sft(rows, g)
    return 0.001


ORACLES = {
    "sft": sft,
    "reinforce": reinforce,
    "ppo": ppo,
    "grpo": grpo_preset,
    "dr_grpo": dr_grpo,
    "dapo": dapo,
    "rloo": rloo_preset,
    "reinforce_pp": reinforce_pp,
    "cispo": cispo,
    "gspo": gspo,
    "luffy": luffy,
    "srft": srft,
    "hpt": hpt,
    "hpt_official": hpt_official,
}
