"""The teacher pool: off-policy completions, graded once and frozen, that a run mixes into its
groups (--teacher-mix).

    python train.py build-pool                                 # data/teacher_completions_rl.jsonl -> out/pool/
    python train.py build-pool --source HF_MODEL --hint aware  # sampled from a model instead

Guarantees:
- A pool row holds the problem id, the hint it was written or sampled for, the completion
  and its grade with the GRADER_VERSION that gave it; a run uses only the rows of its hint.
- `teacher_pool` gives a run the entries of its problems as it will use them: a completion
  longer than max_new_tokens is cut there, as a student's would be, and the cut text graded
  anew; so is one whose grade another grader version gave. The default pool is built on a
  miss.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from loguru import logger

from extract import written_completion_ids
from grader import GRADER_VERSION, Grade, Grader, Hint, Problem, RewardConfig, jsonl_rows, load_problems, render_prompt
from projected_grpo.errors import UserError, check_file
from projected_grpo.models import load_model, pick_device
from projected_grpo.paths import DATA, OUT, atomic
from projected_grpo.rollout import RolloutEngine, Sampling


@dataclass(frozen=True)
class PoolConfig:
    """Grade teacher completions once and freeze them as the teacher pool (`just build-pool`)."""

    source: str = str(DATA / "teacher_completions_rl.jsonl")
    """A JSONL of written completions ({id, completion, ...}), or an HF model id / folder to sample from."""
    problems: Path = DATA / "problems_rl.jsonl"
    """Problems the completions answer."""
    hint: Hint = "run_tests"
    """The hint the completions were written or sampled for (the pool is keyed by problem id and hint)."""
    out: Path | None = None
    """Output JSONL; None = out/pool/<source name>-<hint>.jsonl."""
    samples_per_problem: int = 8
    """Completions sampled per problem (model source only)."""
    sampling: Sampling = Sampling()
    """Teacher sampling (model source only)."""
    reward: RewardConfig = RewardConfig()
    """Reward config used to grade (labels are stored; rewards are recomputed by each run)."""
    device: str = "auto"
    """Torch device for a model source."""


def default_pool_path(source: str | Path, hint: str) -> Path:
    """out/pool/<source name>-<hint>.jsonl: where a source's pool for a hint goes by default."""
    return OUT / "pool" / f"{Path(str(source).rstrip('/')).stem}-{hint}.jsonl"


def build_pool(pc: PoolConfig) -> Path:
    """Grade the source's completions (written ones, or sampled from a model) once and write the
    pool, atomically; returns its path. A missing or malformed problems or source file is a
    UserError naming it, raised before a model loads or a completion is graded."""
    problems = {p.id: p for p in check_file(pc.problems, "problems", load_problems)}
    source = Path(pc.source)
    if source.suffix == ".jsonl":
        items = []
        for where, row in check_file(source, "source", lambda path: list(jsonl_rows(path))):
            if not isinstance(row, dict) or row.get("id") not in problems or not isinstance(row.get("completion"), str):
                raise UserError(f"{where}: needs an 'id' from {pc.problems} and a string 'completion'", "fix the row, or pass the problems it was written for with --problems")
            items.append((problems[row["id"]], row["completion"]))
    else:
        model, tokenizer, _ = load_model(pc.source, pick_device(pc.device))
        todo = [p for p in problems.values() for _ in range(pc.samples_per_problem)]
        samples = RolloutEngine(model, tokenizer).generate([render_prompt(tokenizer, p, pc.hint) for p in todo], pc.sampling, desc="teacher")
        items = [(p, c.text) for p, c in zip(todo, samples)]
    with Grader(pc.reward) as grader:
        grades = grader.grade([p for p, _ in items], [c for _, c in items])
    out = pc.out or default_pool_path(pc.source, pc.hint)
    with atomic(out) as tmp, tmp.open("w") as f:
        for (p, completion), g in zip(items, grades):
            f.write(json.dumps({"id": p.id, "hint": pc.hint, "source": pc.source, "completion": completion, "grader_version": GRADER_VERSION} | asdict(g)) + "\n")
    n_hack = sum(g.reward_hack for g in grades)
    logger.info(f"teacher pool {out}: {len(items)} completions for {len({p.id for p, _ in items})} problems, {n_hack} strict hacks, {sum(g.gt_pass for g in grades)} gt passes")
    return out


def load_pool(path: Path, hint: str) -> dict[int, list[tuple[str, Grade | None]]]:
    """Pool entries by problem id, for this hint only: a pool built for another hint is never used.
    An entry graded by another grader version than GRADER_VERSION comes without its grade. A
    missing, unreadable or foreign pool is a UserError naming it."""
    rebuild = f"rebuild it with `just build-pool --hint {hint}`, or pass --teacher-mix 0"
    if not path.exists():
        raise UserError(f"teacher pool {path} does not exist", rebuild)
    try:
        rows = list(jsonl_rows(path))
    except ValueError as e:  # a line that is not JSON, named by file and line
        raise UserError(str(e), rebuild) from e
    pool: dict[int, list[tuple[str, Grade | None]]] = {}
    for where, row in rows:
        current = isinstance(row, dict) and row.get("grader_version") == GRADER_VERSION
        missing = [k for k in ("id", "hint", "completion", *(Grade.__dataclass_fields__ if current else ())) if not isinstance(row, dict) or k not in row]
        if missing:
            raise UserError(f"{where}: teacher pool row lacks {missing}", rebuild)
        if row["hint"] == hint:
            pool.setdefault(row["id"], []).append((row["completion"], Grade(**{k: row[k] for k in Grade.__dataclass_fields__}) if current else None))
    if not pool:
        raise UserError(f"teacher pool {path} has no completions for hint {hint!r}", rebuild)
    return pool


def teacher_pool(cfg, problems: list[Problem], tokenizer, grader: Grader) -> dict[int, list[tuple[list[int], str, Grade]]]:
    """The teacher rollouts by problem id of a run (`cfg`: its resolved train.Config), for its
    `problems`: (token ids, text, grade). The default pool is built on a miss. A completion
    longer than max_new_tokens is cut there, as a student's would be, and the cut text is
    graded anew; so is one the pool holds no grade of this grader version for (load_pool)."""
    if not cfg.teacher_pool.exists() and cfg.teacher_pool == default_pool_path(cfg.teacher_source, cfg.hint):
        build_pool(PoolConfig(source=str(cfg.teacher_source), problems=cfg.problems, hint=cfg.hint, reward=cfg.reward, out=cfg.teacher_pool))
    problems = {p.id: p for p in problems}
    cut = cfg.sampling.max_new_tokens
    pool: dict[int, list] = {}
    todo, n_cut = [], 0  # (problem id, index) of the entries to grade anew
    for pid, entries in load_pool(cfg.teacher_pool, cfg.hint).items():
        if pid not in problems:
            continue
        pool[pid] = []
        for text, grade in entries:
            ids = written_completion_ids(tokenizer, text)
            if len(ids) > cut:
                ids, text, grade, n_cut = ids[:cut], tokenizer.decode(ids[:cut], skip_special_tokens=True), None, n_cut + 1
            if grade is None:
                todo.append((pid, len(pool[pid])))
            pool[pid].append((ids, text, grade))
    if todo:
        for (pid, i), grade in zip(todo, grader.grade([problems[pid] for pid, _ in todo], [pool[pid][i][1] for pid, i in todo])):
            pool[pid][i] = (*pool[pid][i][:2], grade)
        logger.info(
            f"teacher pool {cfg.teacher_pool}: {len(todo)}/{sum(len(e) for e in pool.values())} completions regraded: {n_cut} cut at "
            f"max_new_tokens={cut}, {len(todo) - n_cut} graded by another grader version than {GRADER_VERSION} (rebuild the pool to store new grades)"
        )
    return pool
