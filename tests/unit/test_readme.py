"""The README stays true: its test command is what CI runs, its algorithm table is the registry's."""

from __future__ import annotations

import re
from pathlib import Path

from hpt_megatron.cli import algorithms_markdown, train_main

ROOT = Path(__file__).resolve().parents[2]


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command():
    ci_lines = [
        ln
        for ln in (ROOT / ".ci/run").read_text().splitlines()
        if ln and not ln.startswith(("#", "set ", "cd "))
    ]
    assert len(ci_lines) == 2
    block = re.search(r"```bash\n(.*?)```", readme(), re.S).group(1)
    commands = [ln for ln in block.splitlines() if ln and not ln.startswith("#")]
    assert commands[1] == ci_lines[0], "README's second command must be exactly what .ci/run executes"
    # then the real-vLLM tests (vLLM's CPU build, in its own environment), also shown in the README
    assert ci_lines[1] == "bash scripts/test_vllm_cpu.sh" and commands[2] == ci_lines[1]
    assert "ruff check" in commands[1] and "pytest" in commands[1]
    assert "hpt-train configs/tiny_cpu.yaml" in commands[0]


def test_algorithm_table_matches_registry():
    table = re.search(r"<!-- algorithms:start -->\n(.*?)\n<!-- algorithms:end -->", readme(), re.S).group(1)
    assert table == algorithms_markdown(), "regenerate with: hpt-train --list-algorithms --markdown"


def test_list_algorithms_prints_every_preset(capsys):
    from hpt_megatron.algo import PRESETS

    assert train_main(["--list-algorithms"]) == 0
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name
        for term in preset.build().terms.values():
            assert term.mask.name in out and term.ref.name in out and term.advantage.name in out
