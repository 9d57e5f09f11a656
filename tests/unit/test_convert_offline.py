"""Offline HF <-> Megatron conversion: bit-exact round trips, HF loadability, CLI, error messages."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hpt_megatron.convert import hf_to_megatron, megatron_to_hf
from hpt_megatron.convert.cli import main
from hpt_megatron.convert.sharded import shard_file
from tests import hf_tiny

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """kind -> (directory, model) for every tiny model; a tokenizer config rides along."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in hf_tiny.KINDS:
        model = hf_tiny.save_tiny(kind, root / kind)
        (root / kind / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
        out[kind] = (root / kind, model)
    return out


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.parametrize("kind", hf_tiny.KINDS)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_round_trip_is_bit_exact(hf_models, tmp_path, kind, tp, pp):
    src, _ = hf_models[kind]
    hf_to_megatron(src, tmp_path / "mg", tp, pp, progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)
    before, after = _hf_tensors(src), _hf_tensors(tmp_path / "hf")
    assert set(before) == set(after)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name


def test_megatron_shards_have_megatron_shapes(hf_models, tmp_path):
    src, _ = hf_models["qwen2"]
    hf_to_megatron(src, tmp_path / "mg", 2, 2, progress=False)
    first = load_file(str(shard_file(tmp_path / "mg", "model", 1, 0)))
    last = load_file(str(shard_file(tmp_path / "mg", "model", 1, 1)))
    assert first["embedding.word_embeddings.weight"].shape == (256, 64)  # 512 padded rows / 2
    assert first["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 16 // 2, 64)
    assert first["decoder.layers.1.mlp.linear_fc1.weight"].shape == (128, 64)
    assert first["decoder.layers.1.self_attention.linear_proj.weight"].shape == (64, 32)
    assert "decoder.layers.2.mlp.linear_fc2.weight" in last and "output_layer.weight" in last


@pytest.mark.parametrize("kind", hf_tiny.KINDS)
def test_output_loads_in_transformers_with_the_same_logits(hf_models, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    src, model = hf_models[kind]
    assert (
        main(
            [
                "hf-to-megatron",
                "--hf-dir",
                str(src),
                "--output-dir",
                str(tmp_path / "mg"),
                "--tp",
                "2",
                "--pp",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "megatron-to-hf",
                "--megatron-dir",
                str(tmp_path / "mg"),
                "--output-dir",
                str(tmp_path / "hf"),
                "--max-shard-gb",
                str(200e3 / 1024**3),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # several shards
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x = hf_tiny.tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_bf16_output(hf_models, tmp_path):
    src, _ = hf_models["llama3"]
    hf_to_megatron(src, tmp_path / "mg", 1, 1, dtype=torch.bfloat16, progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)
    tensors = _hf_tensors(tmp_path / "hf")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    ref = _hf_tensors(src)
    assert all(torch.equal(tensors[n], ref[n].bfloat16()) for n in ref)


def test_tools_wrappers_run(hf_models, tmp_path):
    src, _ = hf_models["qwen2_tied"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    for script, args in (
        ("hf_to_megatron.py", ["--hf-dir", str(src), "--output-dir", str(tmp_path / "mg"), "--tp", "2"]),
        ("megatron_to_hf.py", ["--megatron-dir", str(tmp_path / "mg"), "--output-dir", str(tmp_path / "hf")]),
    ):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools/convert" / script), *args, "--no-progress"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
    assert set(_hf_tensors(tmp_path / "hf")) == set(_hf_tensors(src))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _cli_error(capsys, argv: list[str]) -> str:
    assert main([*argv, "--no-progress"]) == 2
    return capsys.readouterr().err


def test_error_unsupported_architecture(hf_models, tmp_path, capsys):
    bad = _copy(hf_models["qwen2"][0], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text()) | {"architectures": ["GPT2LMHeadModel"]}
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _cli_error(capsys, ["hf-to-megatron", "--hf-dir", str(bad), "--output-dir", str(tmp_path / "o")])
    assert "config.json: architectures=['GPT2LMHeadModel'] is not supported" in err
    assert "LlamaForCausalLM" in err and "Qwen2ForCausalLM" in err


def test_error_layout_does_not_divide(hf_models, tmp_path, capsys):
    src = str(hf_models["qwen2"][0])
    err = _cli_error(
        capsys, ["hf-to-megatron", "--hf-dir", src, "--output-dir", str(tmp_path / "o"), "--tp", "3"]
    )
    assert "num_attention_heads=4 is not divisible by tp=3" in err
    err = _cli_error(
        capsys, ["hf-to-megatron", "--hf-dir", src, "--output-dir", str(tmp_path / "o"), "--pp", "3"]
    )
    assert "num_hidden_layers=4 is not divisible by pp=3" in err


def _edit_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_error_missing_unexpected_and_shape(hf_models, tmp_path):
    src = hf_models["qwen2"][0]
    cases = {
        "missing tensors \\['model.layers.1.self_attn.k_proj.bias'\\]": lambda t: t.pop(
            "model.layers.1.self_attn.k_proj.bias"
        ),
        "unexpected tensors \\['model.layers.0.extra.weight'\\]": lambda t: t.update(
            {"model.layers.0.extra.weight": torch.zeros(2)}
        ),
        r"shape mismatch for model.layers.2.mlp.up_proj.weight: checkpoint has \[64, 64\], "
        r"config.json implies \[128, 64\]": lambda t: t.update(
            {"model.layers.2.mlp.up_proj.weight": torch.zeros(64, 64)}
        ),
    }
    for i, (message, edit) in enumerate(cases.items()):
        bad = _copy(src, tmp_path / f"bad{i}")
        _edit_weights(bad, edit)
        with pytest.raises(ValueError, match=message):
            hf_to_megatron(bad, tmp_path / f"out{i}", 1, 1, progress=False)
        assert not (tmp_path / f"out{i}").exists()


def test_error_megatron_side_missing_tensor(hf_models, tmp_path):
    hf_to_megatron(hf_models["llama3"][0], tmp_path / "mg", 1, 2, progress=False)
    path = shard_file(tmp_path / "mg", "model", 0, 1)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors.pop("decoder.final_layernorm.weight")
    rules = {k: v for k, v in json.loads(meta["rules"]).items() if k in tensors}
    save_file(tensors, str(path), metadata={**meta, "rules": json.dumps(rules)})
    with pytest.raises(ValueError, match=re.escape("missing tensors ['decoder.final_layernorm.weight']")):
        megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)


def test_error_output_exists(hf_models, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    src = str(hf_models["qwen2"][0])
    err = _cli_error(capsys, ["hf-to-megatron", "--hf-dir", src, "--output-dir", str(tmp_path / "o")])
    assert f"{tmp_path / 'o'} already exists; pass --overwrite" in err
    assert (
        main(
            [
                "hf-to-megatron",
                "--hf-dir",
                src,
                "--output-dir",
                str(tmp_path / "o"),
                "--overwrite",
                "--no-progress",
            ]
        )
        == 0
    )
