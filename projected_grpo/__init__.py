"""The machinery behind the four scripts at the root (train.py, extract.py, grader.py,
projection.py). Nothing is imported here: each module is imported by name.

Models and numerics: models (where models come from, log-probs), packing (the learner's packed
rows and their attention), activations (activation checkpointing per micro-batch), svd_adapter (the delta_S adapter), rollout (the sampling engine),
distributed (the torchrun process group).
A run's parts: teacher_pool (the frozen teacher rollouts), checkpoints, metrics (what a step
records: the log keys, the console table, the summary), eval (held-out hack and pass rates),
diagnose (v_hack's quality report), sandbox (isolated program runs for grader.py).
Across runs: results (tables and the H1 verdict across seeds), sweep (queues whole sweeps).
Leaving the harness: export (a checkpoint as a Hugging Face model folder), tracking (--report-to).
Plumbing: paths (repo root, data/, out/, atomic writes), typecheck (BEARTYPE=1), errors (user
errors: one line, exit 2).

Imports go one way, no cycles: paths, typecheck, errors, tracking, sandbox, distributed,
packing, activations (and projection.py) import no other harness module; models imports paths and packing,
svd_adapter paths, rollout svd_adapter (which projections it may fuse); grader.py
imports sandbox; extract.py, metrics and checkpoints sit on those; diagnose, teacher_pool and
eval on extract.py and grader.py; train.py on all of these; sweep on train.py, results on metrics,
export on models, svd_adapter and checkpoints.
"""
