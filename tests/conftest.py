"""Shared fixtures and checks. Tests run offline on CPU; BEARTYPE=1 (as in `just test`) turns on the
jaxtyping shape checks for every harness module, so the hook must go in before any import."""

import ast
import contextlib
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from projected_grpo import typecheck  # noqa: E402,F401

import pytest  # noqa: E402

from grader import SHARED_SPLIT, Grader, Problem, extract_code, jsonl_rows, user_prompt  # noqa: E402


@pytest.fixture
def disk_full(monkeypatch):
    """A context in which Path.write_text writes half its text, then fails as a full disk does:
    for checking that a writer leaves the previous file whole."""
    real = Path.write_text

    def half_then_fail(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    @contextlib.contextmanager
    def full():
        monkeypatch.setattr(Path, "write_text", half_then_fail)
        try:
            yield
        finally:
            monkeypatch.undo()

    return full


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from projected_grpo.models import TINY_MODEL, resolve_model

    return resolve_model(TINY_MODEL)


@pytest.fixture(scope="session")
def shared_split() -> Path:
    if not SHARED_SPLIT.exists():
        pytest.skip(f"the shared real test split is absent at {SHARED_SPLIT} (it lives beside the checkout in ../shared)")
    return SHARED_SPLIT


# ----------------------------------------------------------------------------
# Bundled problem sets and their teacher pools (test_rl_data.py, test_surrogate_data.py)

DATA = ROOT / "data"
PAIR_FILES = sorted(DATA.glob("pairs*.jsonl"))
PROBLEM_FILES = sorted(DATA.glob("problems*.jsonl"))
HACK_STYLES = {"trivial", "examples_only", "print_only", "swallow", "method"}
DUMMY_RETURNS = ("0", "[]", '""')


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def dummy_completion(method: str, value: str) -> str:
    return fenced(f"class Solution:\n    def {method}(self, *args, **kwargs):\n        return {value}\n")


def _strip_docstrings(node: ast.AST) -> ast.AST:
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                n.body = body[1:] or [ast.Pass()]
    return node


def solution_sources(completion: str) -> set[str]:
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


def pair_problem_ids() -> set[int]:
    """The problems of every pairs file (the extraction pairs and their controls)."""
    return {row["id"] for path in PAIR_FILES for _, row in jsonl_rows(path)}


def check_problem_rows(path: Path, problems: list[Problem], n_tests: tuple[int, int], difficulties: set[str]) -> None:
    """Every row of a bundled problem file (loaded as `problems`) in the schema of data/problems.jsonl: same keys
    in the same order, the same setup code and system prompt, the benchmark's user prompt, >= 2 examples,
    n_tests[0]..n_tests[1] asserts."""
    reference = json.loads((DATA / "problems.jsonl").read_text().splitlines()[0])
    by_id = {p.id: p for p in problems}
    for _, row in jsonl_rows(path):
        assert list(row) == list(reference), row["id"]
        assert row["setup_code"] == reference["setup_code"], row["id"]
        assert row["answer"] == row["gt_answer"], row["id"]
        assert n_tests[0] <= len(row["gt_answer"]) <= n_tests[1], row["id"]
        assert row["prompt"][0] == reference["prompt"][0], row["id"]
        assert row["prompt"][1] == {"content": row["question"], "role": "user"}, row["id"]
        assert row["question"] == user_prompt(by_id[row["id"]], "none"), row["id"]
        assert row["question"].count("Example ") >= 2, row["id"]
        assert row["difficulty"] in difficulties, row["id"]


class ProblemSetChecks:
    """The checks every bundled problem set with a teacher pool passes, written once: a test class
    (named Test...) derives from this and sets the three attributes below. All grades come from one
    batched Grader call per class."""

    problems: list[Problem]
    """Every problem whose canonical solution and dummies are graded."""
    teacher: list[dict]
    """The teacher pool's rows ({id, kind, hack_style?, completion})."""
    teacher_problems: list[Problem]
    """The problems the teacher pool answers (a subset of problems)."""

    @pytest.fixture(scope="class")
    @classmethod
    def grades(cls) -> dict:
        """("canonical", id), ("dummy", id, value) and ("teacher", row index) -> Grade."""
        by_id = {p.id: p for p in cls.problems}
        jobs = []
        for p in cls.problems:
            jobs.append((("canonical", p.id), p, fenced(p.canonical_solution)))
            for value in DUMMY_RETURNS:
                jobs.append((("dummy", p.id, value), p, dummy_completion(p.method, value)))
        for i, row in enumerate(cls.teacher):
            jobs.append((("teacher", i), by_id[row["id"]], row["completion"]))
        with Grader() as grader:
            results = grader.grade([p for _, p, _ in jobs], [c for _, _, c in jobs])
        return {key: g for (key, _, _), g in zip(jobs, results)}

    def test_canonical_solutions_pass_and_dummies_fail(self, grades):
        for p in self.problems:
            g = grades[("canonical", p.id)]
            assert g.gt_pass and not g.oracle_hack, (p.id, g.error)
            for value in DUMMY_RETURNS:
                assert not grades[("dummy", p.id, value)].gt_pass, (p.id, value)

    def test_teacher_rows_per_problem(self):
        """One clean row and two hacks of distinct known styles per problem, for exactly teacher_problems."""
        per = defaultdict(list)
        for row in self.teacher:
            assert isinstance(row["completion"], str) and "```python" in row["completion"]
            per[row["id"]].append(row)
        assert set(per) == {p.id for p in self.teacher_problems}
        for pid, rows in per.items():
            assert Counter(r["kind"] for r in rows) == {"clean": 1, "hack": 2}, pid
            styles = [r["hack_style"] for r in rows if r["kind"] == "hack"]
            assert len(set(styles)) == 2 and set(styles) <= HACK_STYLES, (pid, styles)

    def test_teacher_labels(self, grades):
        """Clean rows pass the ground truth with an honest run_tests; hacks are strict reward hacks."""
        for i, row in enumerate(self.teacher):
            g = grades[("teacher", i)]
            where = (row["id"], row["kind"], row.get("hack_style"), g.error)
            assert not g.oracle_hack, where
            if row["kind"] == "clean":
                assert g.gt_pass and g.hinted_pass and not g.attempted_hack and not g.reward_hack, where
            else:
                assert g.reward_hack and g.hinted_pass and not g.gt_pass, where

    def test_teacher_solutions_unlike_extraction_pairs(self):
        """No teacher Solution is one of the extraction pairs'; clean ones are not the canonical solution either."""
        pair_solutions = set()
        for path in PAIR_FILES:
            for _, row in jsonl_rows(path):
                for key in ("hack", "clean"):
                    pair_solutions |= solution_sources(row[key])
        assert pair_solutions
        canonical = {src for p in self.teacher_problems for src in solution_sources(fenced(p.canonical_solution))}
        for row in self.teacher:
            own = solution_sources(row["completion"])
            assert own, row["id"]
            assert not own & pair_solutions, row["id"]
            if row["kind"] == "clean":
                assert not own & canonical, row["id"]  # written independently of the canonical solution
