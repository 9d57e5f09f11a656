"""The HF engine's sampler: exact log-probs, batch-independent samples, correct filtering."""

from __future__ import annotations

import math

import pytest
import torch

from hpt_megatron.rollout import SamplingParams
from hpt_megatron.rollout.hf_engine import HFEngine
from hpt_megatron.rollout.sampling import filter_logits, gumbel_noise
from tests import hf_tiny


class Tok:
    """The minimum of a tokenizer the engine needs."""

    eos_token_id = 7
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def engine():
    model = hf_tiny.tiny_model("qwen2")
    model.generation_config.eos_token_id = 7
    return HFEngine(model, Tok(), max_batch=512)


PROMPTS = [[5, 9, 11, 3], [12, 13], [40, 41, 42, 43, 44, 45], [8]]


def test_logprobs_are_the_models_tempered_distribution(engine):
    """Each reported log-prob equals log_softmax(logits / T) of a full, cache-free forward pass."""
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=12, seed=3)
    out = engine.generate(PROMPTS, params)
    for prompt, completions in zip(PROMPTS, out):
        for c in completions:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = engine.model(ids).logits[0, len(prompt) - 1 : -1].float()
            ref = (
                torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            )
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, rtol=1e-4, atol=1e-4)
            assert len(c.token_ids) <= 12
            assert (c.finish_reason == "stop") == (c.token_ids[-1] == 7)


def test_samples_do_not_depend_on_batching_or_sharding(engine):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=11)
    whole = engine.generate(PROMPTS, params)
    # two shards, as two workers would get them, and a tiny batch size
    engine.max_batch = 2
    first = engine.generate(PROMPTS[:1], params)
    rest = engine.generate(
        PROMPTS[1:], SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=11, prompt_offset=1)
    )
    engine.max_batch = 512
    assert [[c.token_ids for c in r] for r in whole] == [[c.token_ids for c in r] for r in first + rest]
    # and a different seed samples differently
    other = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=12))
    assert [[c.token_ids for c in r] for r in other] != [[c.token_ids for c in r] for r in whole]


def test_ended_sequences_leave_the_batch_without_changing_any_sample(monkeypatch):
    """Sequences that end are dropped from the batch and its KV cache as decoding goes on; every
    sample equals the one drawn alone (batch of one, nothing to drop), log-probs to numerics."""
    from transformers.cache_utils import Cache

    model = hf_tiny.tiny_model("qwen2")
    model.generation_config.eos_token_id = list(range(0, hf_tiny.VOCAB, 4))  # a quarter of the vocab
    engine = HFEngine(model, Tok(), max_batch=512)
    params = SamplingParams(n=6, temperature=1.0, max_new_tokens=16, seed=5)
    drops = []
    select = Cache.batch_select_indices
    monkeypatch.setattr(
        Cache, "batch_select_indices", lambda self, i: (drops.append(len(i)), select(self, i))
    )
    batched = engine.generate(PROMPTS, params)
    assert len(drops) >= 2  # the batch shrank more than once
    lengths = [len(c.token_ids) for cs in batched for c in cs]
    assert min(lengths) < 4 and max(lengths) > 8  # some ended early, others ran on
    engine.max_batch = 1
    alone = engine.generate(PROMPTS, params)
    for cs_b, cs_a in zip(batched, alone):
        for b, a in zip(cs_b, cs_a):
            assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
            torch.testing.assert_close(
                torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=1e-5, atol=1e-5
            )


def test_stop_strings_end_tokens_and_logprobs_too(engine):
    """A stop string ends the completion at the token that completes it: the trained tokens and
    log-probs are those of the rewarded text."""
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=5)
    free = engine.generate(PROMPTS, params)
    # stop at the third generated token of the first sample (its text, as Tok decodes it)
    first = free[0][0]
    assert len(first.token_ids) > 2
    stop = f" {first.token_ids[2]}"
    stopped = engine.generate(PROMPTS, SamplingParams(**{**vars(params), "stop": (stop,)}))
    for free_row, stop_row in zip(free, stopped):
        for f, c in zip(free_row, stop_row):
            text = " ".join(map(str, f.token_ids))
            if stop not in text:
                assert c.token_ids == f.token_ids  # no stop string: unchanged
                continue
            # the shortest prefix of the free sample whose text contains the stop string
            m = next(i for i in range(1, len(f.token_ids) + 1) if stop in " ".join(map(str, f.token_ids[:i])))
            assert c.token_ids == f.token_ids[:m] and c.logprobs == f.logprobs[:m]
            assert c.finish_reason == "stop" and c.text == " ".join(map(str, f.token_ids[:m]))


def test_greedy_is_argmax(engine):
    out = engine.generate(PROMPTS[:1], SamplingParams(n=2, temperature=0.0, max_new_tokens=6))
    a, b = out[0]
    assert a.token_ids == b.token_ids
    ids = list(PROMPTS[0])
    for tok in a.token_ids:
        with torch.no_grad():
            ids.append(int(engine.model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert ids[-1] == tok


def test_filter_logits_against_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 30, generator=g, dtype=torch.float64)
    for top_k, top_p in [(4, 1.0), (0, 0.5), (10, 0.8), (0, 1.0)]:
        got = filter_logits(logits, top_k, top_p)
        for row in range(5):
            # top-k first; top-p then applies to the distribution renormalised over the top k
            order = torch.argsort(logits[row], descending=True).tolist()
            keep = order[:top_k] if top_k else order
            probs = torch.softmax(logits[row, keep], -1).tolist()
            mass, expected = 0.0, set()
            for t, p in zip(keep, probs):
                if mass <= top_p or top_p >= 1.0:
                    expected.add(t)
                mass += p
            assert {t for t in range(30) if math.isfinite(float(got[row, t]))} == expected


def test_gumbel_max_samples_the_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    gens = [torch.Generator().manual_seed(i) for i in range(1)]
    counts = torch.zeros(4)
    for _ in range(20000):
        counts[int((logits + gumbel_noise(gens, 4).float()).argmax())] += 1
    freq = counts / counts.sum()
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)
