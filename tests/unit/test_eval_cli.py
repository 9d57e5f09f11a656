"""``hpt-eval`` end to end on a tiny model saved to disk, and its error messages.

The model is wired by hand so that its answers are known in distribution: every block's output is
zeroed, so the logits depend on the current token only, and the LM head maps each token of
``\\boxed{1}`` / ``\\boxed{2}`` to the next one. After ``{`` the digits 1 and 2 get identical logits, so
each sample is right with probability 1/2 on problems answered 1 or 2 and never on others. That makes
the checks below compare non-trivial numbers, computed independently from samples.jsonl.
"""

from __future__ import annotations

import json
import re
from math import comb
from pathlib import Path

import pytest
import torch

from hpt_megatron.cli import eval_main
from hpt_megatron.data import write_rows
from hpt_megatron.data.tokenizer import EOS, save_tokenizer
from hpt_megatron.rollout.vllm_engine import HAVE_VLLM

# question -> (data_source, ground truth, copies in the file)
PROBLEMS = {
    "Tom has 7 apples.": ("synth", "1", 3),
    "Ann has 3 pens.": ("synth", "2", 1),
    "Ben has 2 cards.": ("synth", "3", 1),
    "Mia has 9 books.": ("other", "1", 1),
    "Sam has 6 coins.": ("other", "5", 1),
}
SYNTH_SAMPLES = 8
NEXT = {"\n": ["\\"], "\\": ["boxed"], "boxed": ["{"], "{": ["1", "2"], "1": ["}"], "2": ["}"], "}": [EOS]}


def wired_model(tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        directions = torch.nn.functional.normalize(model.model.embed_tokens.weight, dim=-1)
        head = torch.zeros_like(model.lm_head.weight)
        for current, successors in NEXT.items():
            for successor in successors:
                head[tokenizer.convert_tokens_to_ids(successor)] += (
                    6.0 * directions[tokenizer.convert_tokens_to_ids(current)]
                )
        model.lm_head.weight.copy_(head)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = save_tokenizer(tmp_path_factory.mktemp("model"))
    wired_model(AutoTokenizer.from_pretrained(directory)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    rows = []
    for question, (source, truth, copies) in PROBLEMS.items():
        row = {"data_source": source, "prompt": [{"role": "user", "content": question}]}
        rows += [{**row, "reward_model": {"ground_truth": truth, "style": "rule"}}] * copies
    return write_rows(rows, tmp_path_factory.mktemp("data") / "eval.parquet")


def base_args(model_dir: Path, eval_file: Path, out: Path) -> list[str]:
    return ["--model", str(model_dir), "--files", str(eval_file), "--output-dir", str(out)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def table_cells(markdown: str) -> dict[str, str]:
    """The first table of results.md as {column header: value}."""
    header, _, values = [line for line in markdown.splitlines() if line.startswith("|")][:3]
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return dict(zip(split(header), split(values)))


def test_a_run_writes_consistent_outputs(model_dir, eval_file, tmp_path, capsys):
    out = tmp_path / "eval"
    pass_k = [1, 2, 4, 8]
    argv = [*base_args(model_dir, eval_file, out), "--samples", f"synth={SYNTH_SAMPLES}"]
    argv += ["--pass-k", *map(str, pass_k), "--max-new-tokens", "10", "--workers", "1", "--device", "cpu"]
    assert eval_main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "samples.jsonl", "pass_at_k.png"}
    assert (out / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"

    samples = read_jsonl(out / "samples.jsonl")
    counts = {"synth": SYNTH_SAMPLES, "other": 1}
    assert len(samples) == sum(counts[source] for source, _, _ in PROBLEMS.values())
    assert {s["response"] for s in samples} <= {"\\boxed{1}", "\\boxed{2}"}  # the wiring holds
    for s in samples:
        assert s["correct"] == (s["response"] == f"\\boxed{{{s['ground_truth']}}}")

    results = json.loads((out / "results.json").read_text())
    for source, n in counts.items():
        per_problem: dict[int, list[bool]] = {}
        for s in samples:
            if s["data_source"] == source:
                per_problem.setdefault(s["problem"], []).append(s["correct"])
        got = results["sources"][source]
        questions = [q for q, spec in PROBLEMS.items() if spec[0] == source]
        assert got["problems"] == len(per_problem) == len(questions)
        assert got["rows"] == sum(PROBLEMS[q][2] for q in questions)
        assert got["samples_per_problem"] == n and all(len(c) == n for c in per_problem.values())
        accuracy = sum(sum(c) / n for c in per_problem.values()) / len(per_problem)
        assert got["accuracy"] == pytest.approx(accuracy)
        assert set(got["pass_at_k"]) == {str(k) for k in pass_k if k <= n}
        for k, value in got["pass_at_k"].items():
            k = int(k)
            oracle = [1 - comb(n - sum(c), k) / comb(n, k) for c in per_problem.values()]
            assert value == pytest.approx(sum(oracle) / len(oracle))
    assert 0 < results["sources"]["synth"]["accuracy"] < 2 / 3  # half of 2 of 3 problems, in expectation
    sources = results["sources"].values()
    assert results["average"] == pytest.approx(sum(s["accuracy"] for s in sources) / 2)
    assert results["settings"]["temperature"] == 0.6 and results["settings"]["samples"]["synth"] == 8

    cells = table_cells((out / "results.md").read_text())
    assert cells["synth (avg@8)"] == f"{100 * results['sources']['synth']['accuracy']:.1f}"
    assert cells["other (pass@1)"] == f"{100 * results['sources']['other']['accuracy']:.1f}"
    assert cells["Avg."] == f"{100 * results['average']:.1f}"
    assert "synth (avg@8)" in capsys.readouterr().out


def test_one_sample_everywhere_writes_no_plot(model_dir, eval_file, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "pass_at_k.png").write_bytes(b"stale")
    argv = [*base_args(model_dir, eval_file, out), "--limit", "1", "--max-new-tokens", "10", "--workers", "1"]
    assert eval_main(argv) == 0
    assert not (out / "pass_at_k.png").exists()
    assert len(read_jsonl(out / "samples.jsonl")) == 2  # one problem of each source, one sample each


def test_data_parallel_engines_sample_what_one_engine_samples(model_dir, eval_file, tmp_path):
    """Two engines in their own processes, prompts split between them: every sample's seed comes from
    its global prompt index, so the samples (and everything computed from them) equal one engine's."""
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"dp{n}"
        argv = [*base_args(model_dir, eval_file, out), "--samples", "synth=4", "--pass-k", "1", "2"]
        argv += ["--max-new-tokens", "10", "--workers", "1", "--device", "cpu", "--data-parallel", str(n)]
        assert eval_main(argv) == 0
        outs[n] = read_jsonl(out / "samples.jsonl")
        assert json.loads((out / "results.json").read_text())["settings"]["data_parallel"] == n
    assert len(outs[1]) == 4 * 3 + 2
    assert len({s["response"] for s in outs[1]}) == 2  # sampled, not one fixed answer
    assert [s["response"] for s in outs[2]] == [s["response"] for s in outs[1]]
    assert [(s["problem"], s["correct"]) for s in outs[2]] == [(s["problem"], s["correct"]) for s in outs[1]]


def error_of(argv: list[str], capsys) -> str:
    assert eval_main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--samples", "synth8"], r"--samples 'synth8': expected SOURCE=N .* e\.g\. --samples aime=32"),
        (["--samples", "synth=0"], r"--samples 'synth=0': expected SOURCE=N with N >= 1"),
        (["--pass-k", "1", "2"], r"k=\[2\] .* most any source gets is 1 \(synth\).* --samples synth=2"),
        (["--samples", "synth=4", "--pass-k", "8"], r"k=\[8\] .* is 4 \(synth\).*--samples synth=8"),
        pytest.param(
            ["--engine", "vllm", "--device", "cpu"],
            r"--engine vllm needs vLLM \(bash scripts/install_vllm_cpu.sh .*or use --engine hf",
            marks=pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed: the engine starts (tests/vllm)"),
        ),
        (["--limit", "0"], r"limit must be >= 1"),
        (["--data-parallel", "0", "--device", "cpu"], r"--data-parallel 0: need >= 1 engines"),
        (
            ["--data-parallel", "999", "--device", "cpu"],
            r"--data-parallel 999 on CPU: more engines than .*lower",
        ),
    ],
)
def test_bad_options_name_the_flag_and_the_fix(model_dir, eval_file, tmp_path, capsys, extra, expected):
    err = error_of([*base_args(model_dir, eval_file, tmp_path / "out"), *extra], capsys)
    assert re.search(expected, err), err
    assert not (tmp_path / "out").exists()


def test_missing_inputs_are_named(model_dir, eval_file, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nope.parquet"
    err = error_of(
        ["--model", str(model_dir), "--files", str(eval_file), str(missing), "--output-dir", str(out)], capsys
    )
    assert f"--files {missing}: no such file" in err
    err = error_of(base_args(tmp_path / "no_model", eval_file, out), capsys)
    assert f"--model {tmp_path / 'no_model'}: no such folder" in err
    (tmp_path / "empty").mkdir()
    err = error_of(base_args(tmp_path / "empty", eval_file, out), capsys)
    assert "has no config.json" in err
    bad_row = write_rows(
        [{"data_source": "x", "prompt": [], "reward_model": {"ground_truth": "1"}}], tmp_path / "b.jsonl"
    )
    err = error_of(base_args(model_dir, bad_row, out), capsys)
    assert "b.jsonl line 1: field 'prompt' is an empty list" in err


def test_samples_for_an_absent_source_warn(model_dir, eval_file, tmp_path, capsys):
    argv = [
        *base_args(model_dir, eval_file, tmp_path / "o"),
        "--samples",
        "amc=4",
        "--limit",
        "1",
        "--workers",
        "1",
    ]
    assert eval_main([*argv, "--max-new-tokens", "4"]) == 0
    assert "--samples for amc has no effect: the files hold synth, other" in capsys.readouterr().err


def test_prompts_are_encoded_by_the_saved_tokenizer_json(model_dir, capsys):
    """Next to a qwen2 config.json, transformers rebuilds a custom tokenizer.json as Qwen2Tokenizer, which
    encodes differently; evaluation must encode prompts as the saved file (and training) does."""
    from tokenizers import Tokenizer

    from hpt_megatron.eval.cli import build_parser, load_tokenizer

    args = build_parser().parse_args(["--model", str(model_dir), "--files", "x.parquet"])
    tokenizer = load_tokenizer(args)
    saved = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "<|im_start|>user\nTom has 7 apples.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == saved.encode(text).ids
    assert "does not encode like" in capsys.readouterr().err
