"""The RL problem set (data/problems_rl.jsonl) and its teacher pool
(data/teacher_completions_rl.jsonl): disjoint from the problems and pairs used for v_hack
extraction, canonical solutions correct, teacher labels as their kind says."""

import ast
import json
from collections import Counter, defaultdict

import pytest

from grader import REPO_ROOT, Grader, extract_code, jsonl_rows, load_problems, user_prompt

DATA = REPO_ROOT / "data"
RL_PROBLEMS = DATA / "problems_rl.jsonl"
RL_TEACHER = DATA / "teacher_completions_rl.jsonl"
PAIR_FILES = sorted(DATA.glob("pairs*.jsonl"))
HACK_STYLES = {"trivial", "examples_only", "print_only", "swallow", "method"}
DUMMY_RETURNS = ("0", "[]", '""')

PROBLEMS = load_problems(RL_PROBLEMS)
BY_ID = {p.id: p for p in PROBLEMS}
TEACHER = [row for _, row in jsonl_rows(RL_TEACHER)]


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def _dummy(method: str, value: str) -> str:
    return _fenced(f"class Solution:\n    def {method}(self, *args, **kwargs):\n        return {value}\n")


def _strip_docstrings(node: ast.AST) -> ast.AST:
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                n.body = body[1:] or [ast.Pass()]
    return node


def _solution_sources(completion: str) -> set[str]:
    """Every class Solution of a completion's code, normalised (no comments, docstrings, run_tests; canonical layout)."""
    code = extract_code(completion)
    if code is None:
        return set()
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Solution":
            node.body = [s for s in node.body if not (isinstance(s, ast.FunctionDef) and s.name == "run_tests")]
            out.add(ast.unparse(_strip_docstrings(node)))
    return out


@pytest.fixture(scope="module")
def grades():
    """Every grade this file needs, from one batched Grader call: canonical solutions, dummies, teacher rows."""
    jobs = []
    for p in PROBLEMS:
        jobs.append((("canonical", p.id), p, _fenced(p.canonical_solution)))
        for value in DUMMY_RETURNS:
            jobs.append((("dummy", p.id, value), p, _dummy(p.method, value)))
    for i, row in enumerate(TEACHER):
        jobs.append((("teacher", i), BY_ID[row["id"]], row["completion"]))
    with Grader() as grader:
        results = grader.grade([p for _, p, _ in jobs], [c for _, _, c in jobs])
    return {key: g for (key, _, _), g in zip(jobs, results)}


def test_problems_schema_and_ids():
    assert len(PROBLEMS) == 24
    assert [p.id for p in PROBLEMS] == list(range(900070, 900094))
    extraction_ids = {p.id for p in load_problems(DATA / "problems.jsonl")}
    for path in PAIR_FILES:
        extraction_ids |= {row["id"] for _, row in jsonl_rows(path)}
    assert not extraction_ids & set(BY_ID)
    reference = json.loads((DATA / "problems.jsonl").read_text().splitlines()[0])
    for _, row in jsonl_rows(RL_PROBLEMS):
        assert list(row) == list(reference)
        assert row["setup_code"] == reference["setup_code"]
        assert row["answer"] == row["gt_answer"]
        assert 14 <= len(row["gt_answer"]) <= 19
        assert row["prompt"][0] == reference["prompt"][0]
        assert row["prompt"][1] == {"content": row["question"], "role": "user"}
        assert row["question"] == user_prompt(BY_ID[row["id"]], "none")
        assert row["question"].count("Example ") >= 2
        assert row["difficulty"] in ("medium", "hard")
    assert len({p.method for p in PROBLEMS}) == 24


def test_canonical_solutions_pass_and_dummies_fail(grades):
    for p in PROBLEMS:
        g = grades[("canonical", p.id)]
        assert g.gt_pass and not g.oracle_hack, (p.id, g.error)
        for value in DUMMY_RETURNS:
            assert not grades[("dummy", p.id, value)].gt_pass, (p.id, value)


def test_teacher_rows_per_problem():
    per = defaultdict(list)
    for row in TEACHER:
        assert isinstance(row["completion"], str) and "```python" in row["completion"]
        per[row["id"]].append(row)
    assert set(per) == set(BY_ID)
    for pid, rows in per.items():
        assert Counter(r["kind"] for r in rows) == {"clean": 1, "hack": 2}, pid
        styles = [r["hack_style"] for r in rows if r["kind"] == "hack"]
        assert len(set(styles)) == 2 and set(styles) <= HACK_STYLES, (pid, styles)


def test_teacher_labels(grades):
    for i, row in enumerate(TEACHER):
        g = grades[("teacher", i)]
        where = (row["id"], row["kind"], row.get("hack_style"), g.error)
        assert not g.oracle_hack, where
        if row["kind"] == "clean":
            assert g.gt_pass and g.hinted_pass and not g.attempted_hack and not g.reward_hack, where
        else:
            assert g.reward_hack and g.hinted_pass and not g.gt_pass, where


def test_teacher_solutions_unlike_extraction_pairs():
    pair_solutions = set()
    for path in PAIR_FILES:
        for _, row in jsonl_rows(path):
            for key in ("hack", "clean"):
                pair_solutions |= _solution_sources(row[key])
    assert pair_solutions
    canonical = {src for p in PROBLEMS for src in _solution_sources(_fenced(p.canonical_solution))}
    for row in TEACHER:
        own = _solution_sources(row["completion"])
        assert own, row["id"]
        assert not own & pair_solutions, row["id"]
        if row["kind"] == "clean":
            assert not own & canonical, row["id"]  # written independently of the canonical solution
