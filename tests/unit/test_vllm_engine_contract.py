"""The vLLM engine's contract, checked against a fake vLLM (vLLM cannot run on CPU machines):
call order per step, bucket sizes, the manifest check, and the missing-vLLM error."""

from __future__ import annotations

import types

import pytest
import torch

from hpt_megatron.rollout import SamplingParams
from hpt_megatron.rollout import vllm_engine as ve

MANIFEST = types.SimpleNamespace(
    entries={"a.weight": ((4, 4), "float32"), "b.weight": ((8,), "float32"), "c.bias": ((2,), "float32")}
)


class FakeLLM:
    """Records every call; generate returns one fake sample per requested completion."""

    def __init__(self, events, **kwargs):
        self.events = events
        self.kwargs = kwargs
        self.loaded: list[list[str]] = []
        events.append(("init", kwargs["enable_sleep_mode"]))

    def generate(self, prompts, sps, use_tqdm=False):
        self.events.append(("generate", len(prompts)))
        self.seeds = [sp.seed for sp in sps]
        outs = []
        for p, sp in zip(prompts, sps):
            samples = []
            for j in range(sp.n):
                tok = [p["prompt_token_ids"][-1] + 1 + j, 7]
                lp = [{tok[0]: types.SimpleNamespace(logprob=-0.5)}, {7: types.SimpleNamespace(logprob=-1.5)}]
                samples.append(
                    types.SimpleNamespace(token_ids=tok, text="x", logprobs=lp, finish_reason="stop")
                )
            outs.append(types.SimpleNamespace(outputs=samples))
        return outs

    def sleep(self, level):
        self.events.append(("sleep", level))

    def wake_up(self, tags):
        self.events.append(("wake_up", tuple(tags)))

    def collective_rpc(self, fn, args=()):
        (bucket,) = args
        self.events.append(("load", tuple(n for n, _ in bucket)))
        worker = types.SimpleNamespace(
            model_runner=types.SimpleNamespace(
                model=types.SimpleNamespace(
                    load_weights=lambda weights: self.loaded.append([n for n, _ in weights])
                )
            )
        )
        fn(worker, bucket)


@pytest.fixture
def fake_vllm(monkeypatch):
    events: list = []
    module = types.SimpleNamespace(
        LLM=lambda **kw: FakeLLM(events, **kw),
        SamplingParams=lambda **kw: types.SimpleNamespace(**kw),
    )
    monkeypatch.setattr(ve, "vllm", module)
    monkeypatch.setattr(ve, "HAVE_VLLM", True)
    return events


def buckets(bucket_bytes: int):
    tensors = [("a.weight", torch.zeros(4, 4)), ("b.weight", torch.zeros(8)), ("c.bias", torch.zeros(2))]
    out, cur, size = [], [], 0
    for name, t in tensors:
        cur.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            out.append(cur)
            cur, size = [], 0
    return out + ([cur] if cur else [])


def test_step_call_order_and_buckets(fake_vllm):
    engine = ve.VLLMEngine("/model", tp=2, gpu_memory_utilization=0.5)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=4)
    res = engine.generate([[1, 2], [5]], params)
    assert [[c.token_ids for c in r] for r in res] == [[[3, 7], [4, 7]], [[6, 7], [7, 7]]]
    assert res[0][0].logprobs == [-0.5, -1.5] and res[0][0].finish_reason == "stop"

    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1]], params)
    engine.load_weights(buckets(64), MANIFEST)  # 64 B: a.weight alone, then b + c
    engine.wake()
    engine.generate([[1]], params)

    kinds = [e[0] for e in fake_vllm]
    assert kinds == ["init", "generate", "sleep", "wake_up", "load", "load", "wake_up", "generate"]
    assert fake_vllm[2] == ("sleep", 1)
    # one seed per prompt, from the global prompt index: sharding prompts does not change samples
    shifted = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=3, prompt_offset=1)
    engine.generate([[5]], shifted)
    assert engine.llm.seeds == [SamplingParams(seed=3).prompt_seed(1)]
    assert fake_vllm[3] == ("wake_up", ("weights",)) and fake_vllm[6] == ("wake_up", ("kv_cache",))
    assert [e[1] for e in fake_vllm if e[0] == "load"] == [("a.weight",), ("b.weight", "c.bias")]
    assert engine.llm.loaded == [["a.weight"], ["b.weight", "c.bias"]]
    assert engine.llm.kwargs["tensor_parallel_size"] == 2 and engine.llm.kwargs["enable_sleep_mode"]


def test_incomplete_sync_leaves_the_engine_stale(fake_vllm):
    engine = ve.VLLMEngine("/model")
    engine.sleep()
    with pytest.raises(ValueError, match=r"1 tensors of the manifest never arrived: \['c.bias'\]"):
        engine.load_weights([buckets(10**9)[0][:2]], MANIFEST)
    engine.wake()
    with pytest.raises(RuntimeError, match="stale after an incomplete weight sync"):
        engine.generate([[1]], SamplingParams())
    engine.load_weights(buckets(10**9), MANIFEST)
    engine.generate([[1]], SamplingParams())


def test_mismatched_tensor_is_rejected_before_loading(fake_vllm):
    engine = ve.VLLMEngine("/model")
    bad = [[("a.weight", torch.zeros(4, 5))]]
    with pytest.raises(
        ValueError, match=r"'a.weight' is \[4, 5\] float32, the manifest says \[4, 4\] float32"
    ):
        engine.load_weights(bad, MANIFEST)
    assert not any(e[0] == "load" for e in fake_vllm)
    with pytest.raises(ValueError, match="unexpected tensor 'z'"):
        engine.load_weights([[("z", torch.zeros(1))]], MANIFEST)


def test_missing_vllm_error(monkeypatch):
    monkeypatch.setattr(ve, "HAVE_VLLM", False)
    with pytest.raises(ImportError, match=r"rollout.engine=vllm needs vLLM, which is not installed"):
        ve.VLLMEngine("/model")


def test_actor_config_overrides_reach_vllm(fake_vllm):
    """vLLM reads config.json itself: the actor's RoPE changes must be handed to it."""
    over = {"rope_theta": 40000.0, "max_position_embeddings": 16384}
    engine = ve.VLLMEngine("/model", max_model_len=9216, hf_overrides=over)
    assert engine.llm.kwargs["hf_overrides"] == over and engine.llm.kwargs["max_model_len"] == 9216
    assert "hf_overrides" not in ve.VLLMEngine("/model").llm.kwargs  # nothing to override
