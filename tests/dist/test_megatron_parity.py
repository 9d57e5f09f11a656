"""Megatron GPTModel vs the Hugging Face model (the oracle) under TP/PP, on CPU with gloo.

One launch per (TP, PP) layout runs every check for every tiny model; the tests below read its
results. Checked against HF: logits (local and SDPA attention specs), the training loss and every
parameter gradient through Megatron's pipeline schedule, and the streamed HF export.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hpt_megatron.convert import hf_to_megatron
from hpt_megatron.convert.mapping import EMBEDDING, OUTPUT_LAYER, stage_tensors
from hpt_megatron.convert.sharded import shard_tensor
from hpt_megatron.distributed import launch
from hpt_megatron.models import arch_config_from_hf
from tests import hf_tiny
from tests.dist import megatron_workers as workers

pytestmark = pytest.mark.dist

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
ATOL = 1e-4


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """Tiny HF models saved to disk, their logits / loss / gradients, and Megatron conversions."""
    root = tmp_path_factory.mktemp("parity")
    tokens = hf_tiny.tokens()
    refs = {}
    for kind in hf_tiny.KINDS:
        model = hf_tiny.save_tiny(kind, root / kind)
        logits = model(tokens).logits
        loss = torch.stack(
            [torch.nn.functional.cross_entropy(logits[i, :-1], tokens[i, 1:]) for i in range(len(tokens))]
        ).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        refs[kind] = {"logits": logits.detach(), "loss": loss.detach(), "grads": grads}
        for tp, pp in LAYOUTS:
            hf_to_megatron(root / kind, workers.megatron_dir(root, kind, tp, pp), tp, pp, progress=False)
    return {"root": root, "tokens": tokens, "refs": refs, "results": {}}


def _results(oracle, tp: int, pp: int) -> list[dict]:
    key = (tp, pp)
    if key not in oracle["results"]:
        args = (str(oracle["root"]), tp, pp, oracle["tokens"], hf_tiny.KINDS)
        oracle["results"][key] = launch(workers.parity_worker, tp * pp, args=args)
    return oracle["results"][key]


def _last_stage(results: list[dict]) -> list[dict]:
    return [r for r in results if r["coords"]["pp_rank"] == r["coords"]["pp"] - 1]


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("spec", ["local", "sdpa"])
def test_logits_match_hf(oracle, tp, pp, spec):
    for res in _last_stage(_results(oracle, tp, pp)):
        for kind in hf_tiny.KINDS:
            ref = oracle["refs"][kind]["logits"]
            got = res[kind][f"logits_{spec}"]
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=f"{kind} {spec} tp={tp} pp={pp}")


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_sdpa_attention_equals_local_attention(oracle, tp, pp):
    for res in _last_stage(_results(oracle, tp, pp)):
        for kind in hf_tiny.KINDS:
            torch.testing.assert_close(res[kind]["logits_sdpa"], res[kind]["logits_local"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_loss_and_gradients_match_hf(oracle, tp, pp):
    """Backward through Megatron's schedule (1F1B when pp > 1) gives HF's gradients, shard by shard."""
    results = _results(oracle, tp, pp)
    for kind in hf_tiny.KINDS:
        ref = oracle["refs"][kind]
        arch = arch_config_from_hf(oracle["root"] / kind)
        for res in results:
            c = res["coords"]
            if c["pp_rank"] == pp - 1:
                torch.testing.assert_close(res[kind]["loss"], ref["loss"], atol=1e-5, rtol=0)
            expected = _expected_grads(arch, ref["grads"], c)
            got = res[kind]["grads"]
            assert set(got) == set(expected), f"{kind}: {set(got) ^ set(expected)}"
            for name, grad in got.items():
                if not _split_tied(arch, pp, name):
                    torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-4, msg=f"{kind} {name}")
        if arch.tie_embeddings and pp > 1:
            _check_tied_grads(results, kind, arch, ref["grads"])


def _split_tied(arch, pp: int, name: str) -> bool:
    return arch.tie_embeddings and pp > 1 and name in (EMBEDDING, OUTPUT_LAYER)


def _check_tied_grads(results: list[dict], kind: str, arch, hf_grads: dict) -> None:
    """With tied embeddings on different stages each copy sees only its own use; their sum (what
    the actor's embedding all-reduce produces) is HF's gradient."""
    by_coord = {(r["coords"]["pp_rank"], r["coords"]["tp_rank"]): r for r in results}
    pp = results[0]["coords"]["pp"]
    for tp_rank in range(results[0]["coords"]["tp"]):
        first, last = by_coord[(0, tp_rank)], by_coord[(pp - 1, tp_rank)]
        total = first[kind]["grads"][EMBEDDING] + last[kind]["grads"][OUTPUT_LAYER]
        want = _expected_grads(arch, hf_grads, first["coords"])[EMBEDDING]
        torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-4)


def _expected_grads(arch, hf_grads: dict, c: dict) -> dict:
    """HF gradients (or any HF-named tensors) in this rank's Megatron layout."""
    out = {}
    for bound in stage_tensors(arch, c["pp"], c["pp_rank"]):
        full = bound.to_megatron([hf_grads[h] for h in bound.hf], arch, arch.padded_vocab_size(c["tp"]))
        out[bound.megatron] = shard_tensor(full, bound.split, c["tp"], c["tp_rank"])
    return out


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])
def test_streamed_export_equals_hf_state_dict(oracle, tp, pp):
    results = _results(oracle, tp, pp)
    for kind in hf_tiny.KINDS:
        hf = load_file(str(oracle["root"] / kind / "model.safetensors"))
        exported = next(r[kind]["export"] for r in results if r[kind]["export"] is not None)
        assert list(exported) and set(exported) == set(hf)
        for name, tensor in hf.items():
            assert torch.equal(exported[name], tensor), name
        assert all(r[kind]["export_buckets"] > 1 for r in results)  # buckets are size-bounded


def test_reshard_checkpoint_tp2_to_pp2(oracle, tmp_path):
    """Save at TP=2/PP=1 (params + moments), load at TP=1/PP=2: HF logits, moments intact."""
    root, kind = str(oracle["root"]), "qwen2_tied"
    ckpt = str(tmp_path / "ckpt")
    launch(workers.save_worker, 2, args=(root, ckpt, kind, 2, 1))
    results = launch(workers.load_worker, 2, args=(root, ckpt, kind, 1, 2, oracle["tokens"]))
    assert all(r["moments_ok"] and r["n"] > 0 for r in results)
    torch.testing.assert_close(results[-1]["logits"], oracle["refs"][kind]["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 2), (1, 2, 2)])
def test_adam_step_through_megatron_ddp_matches_torch_adam_on_hf(oracle, tp, pp, world):
    """Grad buffers, DP reduce-scatter, distributed optimizer, tied-embedding all-reduce on CPU.

    A large Adam eps keeps the first step smooth in the gradient: some gradients are zero up to
    rounding (the key bias), and ``g / (|g| + 1e-8)`` would turn that rounding noise into +-lr.
    """
    kind, lr, eps = "qwen2_tied", 1e-2, 1e-3
    model = hf_tiny.tiny_model(kind)
    loss = torch.stack(
        [
            torch.nn.functional.cross_entropy(model(t[None]).logits[0, :-1], t[1:])
            for t in oracle["tokens"]
        ]
    ).mean()
    loss.backward()
    torch.optim.Adam(model.parameters(), lr=lr, eps=eps).step()
    updated = {n: p.detach() for n, p in model.named_parameters()}
    updated.pop("lm_head.weight", None)  # tied: the same tensor as the embedding
    arch = arch_config_from_hf(oracle["root"] / kind)
    args = (str(oracle["root"]), kind, tp, pp, oracle["tokens"], lr, eps)
    for res in launch(workers.train_step_worker, world, args=args):
        assert res["ok"]
        expected = _expected_grads(arch, updated, res["coords"])
        assert set(res["params"]) == set(expected)
        for name, param in res["params"].items():
            torch.testing.assert_close(param, expected[name], atol=1e-5, rtol=1e-4, msg=name)
