"""The evaluation runner with a scripted engine: copies pool, counts are exact, metrics match an oracle."""

from __future__ import annotations

from collections import Counter
from math import comb

import pytest

from hpt_megatron.data import PromptBuilder, write_rows
from hpt_megatron.data.tokenizer import save_tokenizer
from hpt_megatron.eval.runner import EvalSettings, evaluate, load_problems
from hpt_megatron.reward import Verifier
from hpt_megatron.rollout import Completion, SamplingParams

# question -> (data_source, ground truth, copies in the file, correct samples the engine gives)
PROBLEMS = {
    "Tom has 7 apples.": ("aime", "12", 4, 4),
    "Ann has 3 pens.": ("aime", "5", 1, 0),
    "Ben has 2 cards.": ("math", "8", 1, 1),
    "Mia has 9 books.": ("math", "4", 1, 0),
    "Sam has 6 coins.": ("math", "6", 1, 1),
    "Eva has 5 shells.": ("arc_c", "B", 1, 1),
    "Leo has 4 stamps.": ("arc_c", "D", 1, 0),
}
SAMPLES = {"aime": 6}  # 6 samples of a problem stated 4 times: no ceil(6/4) per row


class ScriptedEngine:
    """A RolloutEngine whose t-th sample of a question is correct iff t < that question's quota,
    however the runner batches or repeats prompts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.served: Counter[str] = Counter()
        self.seeds: set[tuple[str, int]] = set()
        self.calls: list[tuple[int, int]] = []  # (prompts, n)

    def question_of(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        (question,) = [q for q in PROBLEMS if q in text]
        return question

    def response(self, question: str) -> str:
        source, truth, _, quota = PROBLEMS[question]
        t = self.served[question]
        self.served[question] += 1
        if t >= quota:
            return "I give up. \\boxed{999}"
        # a choice answer in a form only the multiple-choice grader accepts
        return f"\\boxed{{{truth}. the last option}}" if source == "arc_c" else f"so \\boxed{{{truth}}}"

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        self.calls.append((len(prompts), params.n))
        out = []
        for i, ids in enumerate(prompts):
            question = self.question_of(ids)
            self.seeds |= {(question, params.sample_seed(i, j)) for j in range(params.n)}
            out.append(
                [Completion([1, 2], self.response(question), finish_reason="stop") for _ in range(params.n)]
            )
        return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def verifier():
    with Verifier(num_workers=1, timeout_s=10.0) as v:
        yield v


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    rows = []
    for question, (source, truth, copies, _) in PROBLEMS.items():
        row = {"data_source": source, "prompt": [{"role": "user", "content": question}]}
        rows += [{**row, "reward_model": {"ground_truth": truth}}] * copies
    rows = rows[1:] + rows[:1]  # a copy of the first problem now comes last: copies need not be adjacent
    return write_rows(rows, tmp_path_factory.mktemp("data") / "eval.jsonl")


def run(eval_file, tokenizer, verifier, **settings):
    engine = ScriptedEngine(tokenizer)
    result = evaluate(
        load_problems([eval_file]),
        engine=engine,
        builder=PromptBuilder(tokenizer),
        verifier=verifier,
        settings=EvalSettings(samples=SAMPLES, default_samples=1, **settings),
        progress=False,
    )
    return result, engine


def oracle_pass_at_k(n: int, quotas: list[int], k: int) -> float:
    return sum(1 - comb(n - c, k) / comb(n, k) for c in quotas) / len(quotas)


def test_copies_pool_and_metrics_match_the_oracle(eval_file, tokenizer, verifier):
    result, engine = run(eval_file, tokenizer, verifier, pass_k=(1, 2, 4, 6))
    expected_samples = {q: SAMPLES.get(spec[0], 1) for q, spec in PROBLEMS.items()}
    assert engine.served == expected_samples  # exactly 6 for the problem stated 4 times
    assert sum(prompts for prompts, _ in engine.calls) == len(PROBLEMS)  # each problem prompted once

    by_source = {s.data_source: s for s in result.sources}
    assert list(by_source) == ["aime", "math", "arc_c"]
    for source, metrics in by_source.items():
        specs = [spec for spec in PROBLEMS.values() if spec[0] == source]
        n = SAMPLES.get(source, 1)
        quotas = [min(spec[3], n) for spec in specs]
        assert metrics.problems == len(specs)
        assert metrics.rows == sum(spec[2] for spec in specs)
        assert metrics.samples_per_problem == n
        assert metrics.accuracy == pytest.approx(sum(q / n for q in quotas) / len(quotas))
        assert set(metrics.pass_at_k) == {k for k in (1, 2, 4, 6) if k <= n}
        for k, value in metrics.pass_at_k.items():
            assert value == pytest.approx(oracle_pass_at_k(n, quotas, k))
    assert by_source["arc_c"].accuracy == 0.5  # "B. the last option" graded as a choice
    assert result.average == pytest.approx(sum(s.accuracy for s in result.sources) / 3)
    assert [len(c) for c in result.completions] == [len(g) for g in result.grades]


def test_samples_and_their_seeds_do_not_depend_on_the_batch_size(eval_file, tokenizer, verifier):
    _, one_at_a_time = run(eval_file, tokenizer, verifier, batch_size=1)
    _, all_at_once = run(eval_file, tokenizer, verifier, batch_size=10_000)
    assert len(one_at_a_time.calls) > len(all_at_once.calls)
    assert one_at_a_time.seeds == all_at_once.seeds
    assert len(all_at_once.seeds) == sum(SAMPLES.get(spec[0], 1) for spec in PROBLEMS.values())


def test_pass_k_beyond_every_source_names_the_fix(eval_file, tokenizer, verifier):
    with pytest.raises(ValueError) as err:
        run(eval_file, tokenizer, verifier, pass_k=(1, 8))
    message = str(err.value)
    assert "k=[8]" in message and "is 6 (aime)" in message and "--samples aime=8" in message


def test_limit_keeps_the_first_problems_of_each_source(eval_file):
    everything = load_problems([eval_file])
    for limit in (1, 2):
        kept = load_problems([eval_file], limit=limit)
        for source in ("aime", "math", "arc_c"):
            in_order = [p.example.question for p in everything if p.data_source == source]
            assert [p.example.question for p in kept if p.data_source == source] == in_order[:limit]


def test_settings_reject_nonsense_before_any_work():
    for bad in (dict(default_samples=0), dict(samples={"aime": 0}), dict(pass_k=(0,)), dict(limit=0)):
        with pytest.raises(ValueError):
            EvalSettings(**bad)
    with pytest.raises(ValueError, match="top_p"):
        EvalSettings(top_p=1.5)


def test_sources_come_in_the_papers_column_order_then_file_order():
    from hpt_megatron.data.schema import Example, Message
    from hpt_megatron.eval.metrics import group_problems
    from hpt_megatron.eval.runner import data_sources

    order = ["zeta", "gpqa", "math", "aime25", "alpha", "aime", "math"]
    examples = [Example(str(i), s, (Message("user", f"q{i}"),), None, "1") for i, s in enumerate(order)]
    assert data_sources(group_problems(examples)) == ["aime", "aime25", "math", "gpqa", "zeta", "alpha"]
