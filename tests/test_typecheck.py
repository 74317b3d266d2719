import os
import subprocess
import sys

from conftest import ROOT

PROBE = """
from projected_grpo import typecheck  # noqa: F401
import torch
from projected_grpo.svd_adapter import svd_error
try:
    svd_error(torch.randn(3, 4), torch.randn(5, 2), torch.randn(2), torch.randn(2, 4))  # U has 5 rows, W has 3
except Exception as e:
    print(type(e).__name__)
else:
    print("unchecked")
"""


def probe(beartype: str) -> str:
    env = {**os.environ, "BEARTYPE": beartype}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1]


def test_beartype_env_turns_shape_checks_on_and_off():
    assert probe("1") == "TypeCheckError"
    assert probe("0") != "TypeCheckError"
