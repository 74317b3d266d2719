"""The RL problem set (data/problems_rl.jsonl) and its teacher pool
(data/teacher_completions_rl.jsonl): disjoint from the problems and pairs used for v_hack
extraction, canonical solutions correct, teacher labels as their kind says."""

from conftest import DATA, ProblemSetChecks, check_problem_rows, pair_problem_ids
from grader import jsonl_rows, load_problems

RL_PROBLEMS = DATA / "problems_rl.jsonl"
PROBLEMS = load_problems(RL_PROBLEMS)


class TestRlSet(ProblemSetChecks):
    problems = teacher_problems = PROBLEMS
    teacher = [row for _, row in jsonl_rows(DATA / "teacher_completions_rl.jsonl")]


def test_problems_schema_and_ids():
    assert len(PROBLEMS) == 24
    assert [p.id for p in PROBLEMS] == list(range(900070, 900094))
    extraction_ids = {p.id for p in load_problems(DATA / "problems.jsonl")} | pair_problem_ids()
    assert not extraction_ids & {p.id for p in PROBLEMS}
    check_problem_rows(RL_PROBLEMS, PROBLEMS, (14, 19), {"medium", "hard"})
    assert len({p.method for p in PROBLEMS}) == 24
