"""eval's output files: each whole or not at all, as results.py may read them while a sweep runs."""

import json
from pathlib import Path

import pytest

from projected_grpo.eval import write_eval


def test_a_failed_write_leaves_the_previous_eval_whole(tmp_path, monkeypatch):
    out = tmp_path / "eval" / "problems-step_000002-run_tests-s0"
    write_eval(out, [{"id": 1}], {"n": 1})
    real = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_eval(out, [{"id": 7}, {"id": 8}], {"n": 2})
    monkeypatch.undo()
    assert json.loads((out / "summary.json").read_text()) == {"n": 1} and (out / "grades.jsonl").read_text() == '{"id": 1}\n'
    assert sorted(p.name for p in out.iterdir()) == ["grades.jsonl", "summary.json"]  # no temporary left
