"""The surrogate's problem sets (issue 19): easy training problems (data/problems_easy.jsonl)
with their teacher pool (data/teacher_completions_easy.jsonl), and held-out evaluation problems
(data/problems_heldout.jsonl, 32 easy + 16 medium). Disjoint from every other bundled problem
and pairs file, canonical solutions correct, teacher labels as their kind says, prompts short
enough for SmolLM2."""

import pytest

from conftest import DATA, PROBLEM_FILES, ProblemSetChecks, check_problem_rows, pair_problem_ids
from grader import HINTS, jsonl_rows, load_problems, render_prompt

EASY_PROBLEMS = DATA / "problems_easy.jsonl"
HELDOUT_PROBLEMS = DATA / "problems_heldout.jsonl"
MAX_PROMPT_TOKENS = 1024

LOADED = {path: load_problems(path) for path in PROBLEM_FILES}  # once: loading is slow under BEARTYPE=1
EASY = LOADED[EASY_PROBLEMS]
HELDOUT = LOADED[HELDOUT_PROBLEMS]


class TestSurrogateSets(ProblemSetChecks):
    problems = EASY + HELDOUT
    teacher = [row for _, row in jsonl_rows(DATA / "teacher_completions_easy.jsonl")]
    teacher_problems = EASY


def test_problem_counts_ids_and_difficulties():
    assert [p.id for p in EASY] == list(range(910001, 910065))
    assert [p.id for p in HELDOUT] == list(range(920001, 920049))
    assert {p.difficulty for p in EASY} == {"easy"}
    assert [p.difficulty for p in HELDOUT] == ["easy"] * 32 + ["medium"] * 16
    check_problem_rows(EASY_PROBLEMS, EASY, (12, 20), {"easy"})
    check_problem_rows(HELDOUT_PROBLEMS, HELDOUT, (12, 20), {"easy", "medium"})


@pytest.mark.parametrize("path", [EASY_PROBLEMS, HELDOUT_PROBLEMS], ids=lambda p: p.name)
def test_disjoint_from_every_other_problem_and_pairs_file(path):
    own = LOADED[path]
    others = [p for other, problems in LOADED.items() if other != path for p in problems]
    assert not {p.id for p in own} & ({p.id for p in others} | pair_problem_ids())
    assert not {p.method for p in own} & {p.method for p in others}
    assert not {p.question for p in own} & {p.question for p in others}
    assert len({p.method for p in own}) == len({p.question for p in own}) == len(own)


def test_prompts_fit_smollm2():
    """Every prompt, under every hint and SmolLM2's chat template, within MAX_PROMPT_TOKENS (at most 419 tokens
    under the run_tests hint and 441 under any hint when written)."""
    from projected_grpo.models import SMOLLM2, load_model

    _, tokenizer, _ = load_model(SMOLLM2, "cpu")
    lengths = [len(tokenizer.encode(render_prompt(tokenizer, p, hint))) for p in EASY + HELDOUT for hint in HINTS]
    assert max(lengths) <= MAX_PROMPT_TOKENS
