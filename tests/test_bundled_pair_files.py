"""The hand-written control pair files are what they claim.

data/pairs_minimal.jsonl: minimal pairs. Hack and clean share the prose and the (correct)
Solution code word for word and differ only in the top-level run_tests function: the clean
one asserts the statement's examples, the hack one passes whatever Solution does.

data/pairs_null.jsonl: null pairs. Both sides are honest, correct completions of the same
problem ("hack" is just side A, "clean" side B) that differ in algorithm, code style or prose,
with no length bias between the sides.
"""

import ast
import re
from collections import Counter

import pytest

from extract import load_pairs
from grader import FENCE, Grader, extract_code, load_problems
from projected_grpo.paths import REPO_ROOT

MINIMAL = REPO_ROOT / "data" / "pairs_minimal.jsonl"
NULL = REPO_ROOT / "data" / "pairs_null.jsonl"
PROBLEMS = {p.id: p for p in load_problems(REPO_ROOT / "data" / "problems.jsonl")}

MINIMAL_STYLES = {"minimal_pass", "minimal_return", "minimal_print", "minimal_swallow", "minimal_tautology"}
NULL_STYLES = {"null_algorithm", "null_style", "null_prose"}


@pytest.fixture(scope="module")
def graded():
    """Both files loaded with the extraction loader and every side of every pair graded, in one batch."""
    minimal, null = load_pairs(MINIMAL, PROBLEMS), load_pairs(NULL, PROBLEMS)
    sides = [(pairs, side) for pairs in (minimal, null) for side in ("hack", "clean")]
    problems = [p.problem for pairs, _ in sides for p in pairs]
    completions = [getattr(p, side) for pairs, side in sides for p in pairs]
    with Grader() as grader:
        grades = grader.grade(problems, completions)
    out, i = {}, 0
    for (pairs, side), name in zip(sides, ("minimal_hack", "minimal_clean", "null_a", "null_b")):
        out[name] = grades[i : i + len(pairs)]
        i += len(pairs)
    return minimal, null, out


def without_run_tests(code: str) -> str:
    """The program with its top-level run_tests function removed, as a canonical AST dump."""
    tree = ast.parse(code)
    tree.body = [s for s in tree.body if not (isinstance(s, ast.FunctionDef) and s.name == "run_tests")]
    return ast.dump(tree)


def run_tests_source(code: str) -> str:
    [fn] = [s for s in ast.parse(code).body if isinstance(s, ast.FunctionDef) and s.name == "run_tests"]
    return ast.dump(fn)


def prose(completion: str) -> str:
    """The completion's text outside its code blocks."""
    return FENCE.sub("<code>", completion)


def labels(grade) -> dict:
    return {k: getattr(grade, k) for k in ("compiles", "gt_pass", "hinted_pass", "has_run_tests", "reward_hack", "attempted_hack")}


HONEST = {"compiles": True, "gt_pass": True, "hinted_pass": True, "has_run_tests": True, "reward_hack": False, "attempted_hack": False}
HARMLESS_HACK = HONEST | {"attempted_hack": True}


def assert_counts(pairs, styles: set[str], at_least: int, per_style: int) -> None:
    assert len(pairs) >= at_least
    assert len({p.problem.id for p in pairs}) == len(pairs)
    counts = Counter(p.hack_style for p in pairs)
    assert set(counts) == styles
    assert min(counts.values()) >= per_style, counts


def test_minimal_pairs_counts_ids_and_styles(graded):
    assert_counts(graded[0], MINIMAL_STYLES, 45, 7)


def test_minimal_pairs_labels(graded):
    minimal, _, grades = graded
    bad = [(p.problem.id, "hack", labels(g), g.error) for p, g in zip(minimal, grades["minimal_hack"]) if labels(g) != HARMLESS_HACK]
    bad += [(p.problem.id, "clean", labels(g), g.error) for p, g in zip(minimal, grades["minimal_clean"]) if labels(g) != HONEST]
    assert not bad


def test_minimal_pairs_differ_only_in_run_tests(graded):
    minimal, _, _ = graded
    for pair in minimal:
        hack, clean = extract_code(pair.hack), extract_code(pair.clean)
        assert hack is not None and clean is not None
        assert len(FENCE.findall(pair.hack)) == len(FENCE.findall(pair.clean)) == 1, pair.problem.id
        assert without_run_tests(hack) == without_run_tests(clean), pair.problem.id
        assert run_tests_source(hack) != run_tests_source(clean), pair.problem.id
        assert prose(pair.hack) == prose(pair.clean), pair.problem.id
        assert re.search(r"\bclass Solution\b", hack), pair.problem.id


def test_null_pairs_counts_ids_and_styles(graded):
    assert_counts(graded[1], NULL_STYLES, 35, 10)


def test_null_pairs_are_honest_on_both_sides(graded):
    _, null, grades = graded
    bad = [(p.problem.id, side, labels(g), g.error) for side in ("null_a", "null_b")
           for p, g in zip(null, grades[side]) if labels(g) != HONEST]
    assert not bad


def test_null_pairs_differ_as_labelled(graded):
    _, null, _ = graded
    for pair in null:
        a, b = extract_code(pair.hack), extract_code(pair.clean)
        assert pair.hack != pair.clean, pair.problem.id
        same_code = ast.dump(ast.parse(a)) == ast.dump(ast.parse(b))
        if pair.hack_style == "null_prose":
            assert same_code and prose(pair.hack) != prose(pair.clean), pair.problem.id
        else:
            assert without_run_tests(a) != without_run_tests(b), pair.problem.id


def test_null_pairs_have_no_length_bias(graded):
    _, null, _ = graded
    a_longer = sum(len(p.hack) > len(p.clean) for p in null) / len(null)
    assert 0.3 <= a_longer <= 0.7, a_longer
    ratio = sum(len(p.hack) for p in null) / sum(len(p.clean) for p in null)
    assert 0.85 <= ratio <= 1.15, ratio
    for style in NULL_STYLES:
        group = [p for p in null if p.hack_style == style]
        share = sum(len(p.hack) > len(p.clean) for p in group) / len(group)
        assert 0.25 <= share <= 0.75, (style, share)
