"""GPU checks (skipped without CUDA): bf16 Megatron on NCCL vs the HF model, SDPA vs local attention."""

from __future__ import annotations

import pytest
import torch

from hpt_megatron.convert import hf_to_megatron
from hpt_megatron.distributed import launch
from tests import hf_tiny
from tests.dist import megatron_workers as workers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("kind", hf_tiny.KINDS)
def test_bf16_megatron_matches_hf_on_gpu(tmp_path, kind):
    model = hf_tiny.save_tiny(kind, tmp_path / kind)
    hf_to_megatron(tmp_path / kind, workers.megatron_dir(tmp_path, kind, 1, 1), 1, 1, progress=False)
    tokens = hf_tiny.tokens()
    with torch.no_grad():
        ref = model.to("cuda", torch.bfloat16)(tokens.cuda()).logits.float().cpu()
    out = launch(workers.gpu_logits_worker, 1, args=(str(tmp_path), kind, tokens))[0]
    for spec in ("local", "sdpa"):
        got = out[spec]
        assert got.shape == ref.shape
        # bf16 end to end: compare distributions, not bits.
        diff = (got.log_softmax(-1) - ref.log_softmax(-1)).abs().mean()
        assert diff < 0.05, f"{spec}: mean |log p diff| {diff:.4f}"
    torch.testing.assert_close(out["sdpa"], out["local"], atol=0.1, rtol=0.05)
