"""The RL problem set (data/problems_rl.jsonl) and its teacher pool
(data/teacher_completions_rl.jsonl): disjoint from the problems and pairs used for v_hack
extraction, canonical solutions correct, teacher labels as their kind says."""

import pytest

from conftest import (
    DATA,
    check_canonical_and_dummies,
    check_problem_rows,
    check_teacher_labels,
    check_teacher_rows_per_problem,
    check_teacher_solutions_unlike_pairs,
    grade_problem_sets,
    pair_problem_ids,
)
from grader import jsonl_rows, load_problems

RL_PROBLEMS = DATA / "problems_rl.jsonl"
RL_TEACHER = DATA / "teacher_completions_rl.jsonl"

PROBLEMS = load_problems(RL_PROBLEMS)
BY_ID = {p.id: p for p in PROBLEMS}
TEACHER = [row for _, row in jsonl_rows(RL_TEACHER)]


@pytest.fixture(scope="module")
def grades():
    return grade_problem_sets(PROBLEMS, TEACHER)


def test_problems_schema_and_ids():
    assert len(PROBLEMS) == 24
    assert [p.id for p in PROBLEMS] == list(range(900070, 900094))
    extraction_ids = {p.id for p in load_problems(DATA / "problems.jsonl")} | pair_problem_ids()
    assert not extraction_ids & set(BY_ID)
    check_problem_rows(RL_PROBLEMS, PROBLEMS, (14, 19), {"medium", "hard"})
    assert len({p.method for p in PROBLEMS}) == 24


def test_canonical_solutions_pass_and_dummies_fail(grades):
    check_canonical_and_dummies(PROBLEMS, grades)


def test_teacher_rows_per_problem():
    check_teacher_rows_per_problem(TEACHER, set(BY_ID))


def test_teacher_labels(grades):
    check_teacher_labels(TEACHER, grades)


def test_teacher_solutions_unlike_extraction_pairs():
    check_teacher_solutions_unlike_pairs(PROBLEMS, TEACHER)
