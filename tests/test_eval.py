"""eval's output files: each whole or not at all, as results.py may read them while a sweep runs."""

import json

import pytest

from projected_grpo.eval import write_eval


def test_a_failed_write_leaves_the_previous_eval_whole(tmp_path, disk_full):
    out = tmp_path / "eval" / "problems-step_000002-run_tests-s0"
    write_eval(out, [{"id": 1}], {"n": 1})
    with disk_full(), pytest.raises(OSError, match="No space"):
        write_eval(out, [{"id": 7}, {"id": 8}], {"n": 2})
    assert json.loads((out / "summary.json").read_text()) == {"n": 1} and (out / "grades.jsonl").read_text() == '{"id": 1}\n'
    assert sorted(p.name for p in out.iterdir()) == ["grades.jsonl", "summary.json"]  # no temporary left
