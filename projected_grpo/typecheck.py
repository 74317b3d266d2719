"""`BEARTYPE=1` turns on runtime checking of jaxtyping shape annotations for the harness.

Import this module before any harness module: it installs jaxtyping's import hook with
beartype, so every annotated function and dataclass of the modules below (the root scripts
and every module of the package) is checked on each call. Off by default because the checks
cost a few percent of a step.
"""

import os

HARNESS_MODULES = ["grader", "projection", "extract", "train", "projected_grpo"]  # a package: its modules too

ENABLED = os.environ.get("BEARTYPE", "0") == "1"
if ENABLED:
    from jaxtyping import install_import_hook

    install_import_hook(HARNESS_MODULES, "beartype.beartype")
