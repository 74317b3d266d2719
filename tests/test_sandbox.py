"""sandbox.py through its own API: what a worker imports. Hostile programs are graded
through grader.Grader in test_grader.py."""

import json
import subprocess
import sys

from sandbox import Pool, Run


def test_a_worker_imports_only_the_sandbox():
    """Beyond what the bare interpreter loads at start-up (site's .pth hooks), a fresh worker
    holds only this module: neither grader, nor torch, nor any other package."""
    third_party = "import sys\nextra = sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names))"
    bare = subprocess.run(
        [sys.executable, "-s", "-P", "-c", f"{third_party}\nimport json\nprint(json.dumps(extra))"], capture_output=True, text=True, timeout=60
    )
    expected = sorted({*json.loads(bare.stdout), "sandbox"})
    with Pool(workers=1) as fresh:
        (outcome,) = fresh.run([Run("", third_party, (f"assert extra == {expected!r}, extra",))])
    assert outcome.passed, outcome.reason
