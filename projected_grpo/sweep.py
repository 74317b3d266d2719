"""Queue a sweep of train.py runs on pueue (one box), SLURM (through submitit) or run it here
(`--backend local`: child processes, several at once on this machine's GPU), in order:

1. one v_hack extraction and quality report per distinct pairs file (`train.py diagnose`: the
   very file its runs load, and the report beside it, whose verdict each run records when it
   starts; every arm needs v_hack, vanilla included, since vanilla measures along it);
2. every run, after the diagnosis of its pairs file;
3. each run's held-out eval (`train.py eval --run RUN`), after that run;
4. one results job (`python -m projected_grpo.results RUNS_DIR`, as `just results` runs it, with
   the sweep's --python), after every eval.

    python -m projected_grpo.sweep --dry-run          # the preregistered sweep's jobs, printed
    python -m projected_grpo.sweep                    # ... queued on this box's pueue daemon
    python -m projected_grpo.sweep --backend slurm --slurm.partition gpu --slurm.time-min 1440
    python -m projected_grpo.sweep --preset fast --arms vanilla projected --seeds 1 --train-flags="--steps 50"
    python -m projected_grpo.sweep --backend local --local.parallel 15 --local.hours 0.15 --runs-dir out/sweeps/pc  # again to resume

The default is the preregistered design (docs/spec.md, the 2026-11-25 and 2026-12-04
amendments), an explicit list of arms at seeds 1-3: vanilla; projected and random along
data/pairs.jsonl; projected along data/pairs_null.jsonl (the null-pairs arm); every arm but
vanilla with --project-update. `shuffled` (v_hack's label-shuffled twin) is an optional arm.
Vanilla trains the same whatever the gate and the pairs (it only measures), so it is queued once
per seed, measured along the first pairs file's v_hack (checkpoints keep g_s and g_t, to measure
along any other basis later); projected, random and shuffled once per gate x pairs file x seed,
null_pairs once per gate x seed. Run folders get fixed names (train.py --run-name), so that each
eval job names its run before the run exists. A job whose dependency fails does not run (pueue
fails it, SLURM cancels it).
"""

import functools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import submitit
import tyro

from projected_grpo.checkpoints import checkpoints
from projected_grpo.diagnose import check_pairs
from projected_grpo.paths import DATA, OUT, REPO_ROOT
from projection import Gate
from grader import load_problems
from projected_grpo.errors import UserError, check_file, reported
from projected_grpo.eval import check as check_eval
from train import PRESETS, parse  # the presets, and the job check: each command parsed and checked as train.py would
from train import check as check_run

Arm = Literal["vanilla", "projected", "random", "null_pairs", "shuffled"]
INTERVENTION = {"vanilla": "vanilla", "projected": "projected", "random": "random", "null_pairs": "projected", "shuffled": "shuffled"}  # train.py --intervention of each arm
# Flags each job gets from the sweep itself: the same flag in --train-flags / --eval-flags is refused.
RUN_FLAGS = ("--intervention", "--gate", "--project-update", "--no-project-update", "--seed", "--v-hack.pairs", "--runs-dir", "--run-name", "--resume")
EVAL_FLAGS = ("--run",)


@dataclass(frozen=True)
class PueueConfig:
    """pueue: one box, its daemon (`pueued -d`) already running."""

    group: str = "projected_grpo"
    """pueue group of the sweep's tasks (created if missing; other groups are left alone)."""
    parallel: int = 1
    """Tasks the group runs at once (`pueue parallel`); above 1 each task sees one GPU: CUDA_VISIBLE_DEVICES=$PUEUE_WORKER_ID."""


@dataclass(frozen=True)
class SlurmConfig:
    """SLURM through submitit: one sbatch job per step, chained with --dependency=afterok."""

    partition: str | None = None
    """sbatch --partition; None = the cluster's default partition."""
    account: str | None = None
    """sbatch --account; None = the user's default."""
    gpus: int = 1
    """GPUs of each diagnose, run and eval job (--gpus-per-node); 0 = none. The results job gets none."""
    cpus: int = 8
    """CPUs of each job (--cpus-per-task): the grader's sandbox workers run on them."""
    mem_gb: int | None = None
    """Memory of each job in GB (--mem); None = the partition's default."""
    time_min: int = 1440
    """Wall-clock limit of each diagnose, run and eval job in minutes (a `full` step measured 70-75 s on one H200: ~4 h for 200 steps)."""
    results_time_min: int = 30
    """Wall-clock limit of the results job in minutes."""
    logs: Path | None = None
    """submitit's folder (sbatch scripts, <job id>_0_log.out/.err); None = <runs_dir>/slurm."""


@dataclass(frozen=True)
class LocalConfig:
    """local: the jobs run here as child processes, in dependency order, several at once sharing
    this machine's GPU(s) and cores. Stopped (or past --local.hours), the same command resumes:
    finished jobs are skipped, runs continue from their last checkpoint."""

    parallel: int = 1
    """Jobs at once (a 135M model leaves an H200 mostly idle); each run and eval gets cores / parallel grader workers."""
    hours: float | None = None
    """Stop every job after this long (SIGTERM: a run checkpoints the step in flight; SIGKILL 60 s later) and exit 3; None = run to the end."""


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: its arms (x gates x pairs files) x seeds of one preset, each run with its eval, then the results table."""

    preset: Literal[tuple(PRESETS)] = "full"  # type: ignore[valid-type]
    """train.py preset of every run."""
    arms: tuple[Arm, ...] = ("vanilla", "projected", "random", "null_pairs")
    """Arms: vanilla (once per seed, whatever the gates and pairs files); projected, random, shuffled (--intervention, along each pairs file); null_pairs (projected along --null-pairs)."""
    gates: tuple[Gate, ...] = ("one_sided",)
    """Gates (--gate) of every arm but vanilla."""
    pairs: tuple[Path, ...] = (DATA / "pairs.jsonl",)
    """Pairs files (--v-hack.pairs) of projected, random and shuffled: one diagnosis each; vanilla is measured along the first."""
    null_pairs: Path = DATA / "pairs_null.jsonl"
    """Pairs file of the null_pairs arm (one diagnosis): a file with no hack in it (extract.is_null_pairs)."""
    project_update: bool = True
    """--project-update in every run but vanilla's (the preregistered design); vanilla projects nothing."""
    seeds: tuple[int, ...] = (1, 2, 3)
    """Seeds (--seed)."""
    runs_dir: Path | None = None
    """Folder of the sweep's run folders, tabulated by the results job; None = out/sweeps/<preset>-<time>."""
    train_flags: str = ""
    """More train.py flags for every diagnose job and run, as one string: --train-flags="--steps 50 --lr 5e-4"."""
    eval_flags: str = ""
    """More `train.py eval` flags for every eval, as one string: --eval-flags="--samples-per-problem 4"."""
    python: str = "uv run python"
    """How each job starts Python (e.g. .venv/bin/python where the nodes have no uv)."""
    results: str | None = None
    """Command of the results job, the runs dir its last argument; None = `<--python> -m projected_grpo.results` (what `just results` runs)."""
    backend: Literal["pueue", "slurm", "local"] = "pueue"
    """pueue (one box), slurm (a cluster, through submitit) or local (child processes here, resumable)."""
    dry_run: bool = False
    """Print every job (label, command, the labels it waits for, the backend's options) and queue nothing."""
    pueue: PueueConfig = field(default_factory=PueueConfig)
    """pueue options."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """SLURM options."""
    local: LocalConfig = field(default_factory=LocalConfig)
    """local options."""


@dataclass(frozen=True)
class Job:
    label: str
    """diagnose:<pairs>, run:<run name>, eval:<run name> or results."""
    argv: tuple[str, ...]
    """The command, run in the repository root."""
    after: tuple[str, ...] = ()
    """Labels of the jobs that must succeed first."""
    gpu: bool = True
    """Whether the job needs a GPU (all but the results job)."""


def here(path: Path) -> str:
    """A path as the jobs (run in the repository root) see it: relative inside the repository, else absolute."""
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def flag_of(arg: str) -> str:
    """The flag an argument sets, as train.py's parser reads it (`--a_b=1` sets `--a-b`)."""
    return arg.split("=")[0].replace("_", "-")


def run_name(preset: str, arm: str, gate: str, pairs: Path, seed: int) -> str:
    return f"{preset}_{arm if arm == 'vanilla' else f'{arm}-{gate}'}_{pairs.stem}_s{seed}"


def arm_runs(cfg: SweepConfig) -> list[tuple[str, str, Path]]:
    """(arm, gate, pairs file) of every run of one seed, in the order of cfg.arms."""
    out = []
    for arm in cfg.arms:
        if arm == "vanilla":
            out.append((arm, cfg.gates[0], cfg.pairs[0]))
        else:
            out += [(arm, gate, pairs) for gate in cfg.gates for pairs in ((cfg.null_pairs,) if arm == "null_pairs" else cfg.pairs)]
    return out


def plan(cfg: SweepConfig) -> list[Job]:
    """Every job of the sweep, each after the jobs it needs, in queueing order (seed-major, so that
    a one-at-a-time queue finishes whole seeds first)."""
    if cfg.runs_dir is None:
        raise ValueError("plan needs a runs_dir (sweep() fills in the default)")
    for flags, refused, what in ((cfg.train_flags, RUN_FLAGS, "--train-flags"), (cfg.eval_flags, EVAL_FLAGS, "--eval-flags")):
        clash = [f for f in shlex.split(flags) if flag_of(f) in refused]
        if clash:
            raise UserError(f"{what} {' '.join(clash)}: the sweep sets {', '.join(refused)} itself", f"leave them out of {what}")
    runs_of_seed = arm_runs(cfg)
    files = list(dict.fromkeys(pairs for _, _, pairs in runs_of_seed))  # each pairs file once, in order of first use
    stems = [p.stem for p in files]
    if len(set(stems)) < len(stems):
        raise UserError(f"pairs files {[str(p) for p in files]} share a file name, which names their runs", "rename one")
    names = [run_name(cfg.preset, INTERVENTION[arm], gate, pairs, 0) for arm, gate, pairs in runs_of_seed]
    if len(set(names)) < len(names):
        raise UserError(f"arms {cfg.arms} with pairs {[str(p) for p in cfg.pairs]} queue the same run twice", "give each arm and gate once, and leave --null-pairs out of --pairs")
    py, train_flags, runs = shlex.split(cfg.python), tuple(shlex.split(cfg.train_flags)), here(cfg.runs_dir)
    jobs = [Job(f"diagnose:{p.stem}", (*py, "train.py", "diagnose", cfg.preset, "--v-hack.pairs", here(p), *train_flags)) for p in files]
    evals = []
    for seed in cfg.seeds:
        for arm, gate, pairs in runs_of_seed:
            intervention = INTERVENTION[arm]
            name = run_name(cfg.preset, intervention, gate, pairs, seed)
            arm_flags = () if arm == "vanilla" else ("--gate", gate, *(("--project-update",) if cfg.project_update else ()))
            jobs.append(Job(f"run:{name}", (*py, "train.py", cfg.preset, "--intervention", intervention, *arm_flags, "--v-hack.pairs", here(pairs),
                                            "--seed", str(seed), "--runs-dir", runs, "--run-name", name, *train_flags), (f"diagnose:{pairs.stem}",)))
            evals.append(Job(f"eval:{name}", (*py, "train.py", "eval", "--run", f"{runs}/{name}", *shlex.split(cfg.eval_flags)), (f"run:{name}",)))
            jobs.append(evals[-1])
    results = shlex.split(cfg.results) if cfg.results is not None else (*py, "-m", "projected_grpo.results")  # --python's, as every other job
    jobs.append(Job("results", (*results, runs), tuple(j.label for j in evals), gpu=False))
    labels = [j.label for j in jobs]
    if twice := sorted({label for label in labels if labels.count(label) > 1}):  # a label names one job (its task id, its run folder); arms and gates are checked above
        raise UserError(f"the sweep would queue {', '.join(twice)} more than once", "give each seed once")
    return jobs


def check(cfg: SweepConfig, jobs: list[Job]) -> None:
    """Fail before anything is queued: a missing pairs file or one too short for the quality
    report its diagnose job writes, a run folder that exists, a flag that
    train.py would refuse hours later (one command of each kind is parsed as train.py would, and
    its run checked as train.py checks it), or held-out problems the evals would not find."""
    for p in {pairs for _, _, pairs in arm_runs(cfg)}:
        if not p.exists():
            raise UserError(f"pairs file {p} does not exist", "give an existing file to --pairs or --null-pairs")
        check_pairs(p)
    taken = [j.label for j in jobs if (folder := run_folder(cfg, j)) is not None and folder.exists()]
    if taken and cfg.backend != "local":  # local resumes them
        raise UserError(f"{cfg.runs_dir} already has {', '.join(taken)}", "give another --runs-dir, or --backend local, which resumes them")
    parsed = {}
    for kind in ("diagnose", "run", "eval"):
        argv = next(j.argv for j in jobs if j.label.startswith(kind + ":"))
        _, parsed[kind] = parse(list(argv[argv.index("train.py") + 1 :]))
    check_run(parsed["run"])  # every run differs from this one in arm, seed and pairs file only (checked above)
    check_eval(parsed["eval"])
    check_file(parsed["eval"].problems or parsed["run"].eval_problems, "problems", load_problems)


# ----------------------------------------------------------------------------
# Backends: the options each job is queued with (shown by --dry-run), and the queueing


def pueue_options(cfg: SweepConfig, job: Job, ids: dict[str, str]) -> list[str]:
    """Group, label and dependencies of one job's `pueue add`; `ids` maps the labels queued so far to task ids."""
    after = ["--after", *(ids[a] for a in job.after)] if job.after else []
    return ["--group", cfg.pueue.group, "--label", job.label, *after]


def pueue_add(cfg: SweepConfig, job: Job, ids: dict[str, str]) -> list[str]:
    command = shlex.join(job.argv)
    if cfg.pueue.parallel > 1 and job.gpu:
        command = f"CUDA_VISIBLE_DEVICES=$PUEUE_WORKER_ID {command}"  # pueue runs it through sh
    return ["pueue", "add", "--print-task-id", "--working-directory", str(REPO_ROOT), *pueue_options(cfg, job, ids), "--", command]


def slurm_params(cfg: SweepConfig, job: Job, ids: dict[str, str]) -> dict:
    """submitit SlurmExecutor parameters of one job (every key set: the executor keeps old values)."""
    s = cfg.slurm
    return {
        "job_name": job.label, "partition": s.partition, "account": s.account, "cpus_per_task": s.cpus if job.gpu else 1,
        "gpus_per_node": s.gpus if job.gpu and s.gpus else None, "mem": f"{s.mem_gb}GB" if s.mem_gb and job.gpu else None,
        "time": s.time_min if job.gpu else s.results_time_min,
        "dependency": "afterok:" + ":".join(ids[a] for a in job.after) if job.after else None,
        "additional_parameters": {"kill-on-invalid-dep": "yes"},  # a job whose dependency failed is cancelled, not left pending
    }


def sbatch_options(params: dict) -> str:
    flat = {k: v for k, v in params.items() if k != "additional_parameters"} | params["additional_parameters"]
    return " ".join(f"--{k.replace('_', '-')}={v}" for k, v in flat.items() if v is not None)


def describe(cfg: SweepConfig, jobs: list[Job]) -> str:
    """The dry run: per job its label, the labels it waits for, its command and the backend's options
    (dependencies on jobs not queued yet are shown as <label>)."""
    ids = {j.label: f"<{j.label}>" for j in jobs}
    n_runs = sum(j.label.startswith("run:") for j in jobs)
    if cfg.backend == "pueue":
        how = f"pueue group {cfg.pueue.group}, {cfg.pueue.parallel} task(s) at a time"
    elif cfg.backend == "local":
        how = f"this machine, {cfg.local.parallel} job(s) at a time" + (f" for {cfg.local.hours} h" if cfg.local.hours else "")
    else:
        how = f"slurm through submitit, logs in {here(cfg.slurm.logs or cfg.runs_dir / 'slurm')}"
    lines = [f"{len(jobs)} jobs ({n_runs} run{'s' * (n_runs != 1)} of {cfg.preset}) into {here(cfg.runs_dir)}, on {how}:"]
    for job in jobs:
        lines.append(job.label + (f"  after {', '.join(job.after)}" if job.after else ""))
        lines.append(f"    $ {shlex.join(local_argv(cfg, job) if cfg.backend == 'local' else job.argv)}")
        if cfg.backend == "pueue":
            lines.append(f"    pueue add {' '.join(pueue_options(cfg, job, ids))}")
        elif cfg.backend == "slurm":
            lines.append(f"    sbatch {sbatch_options(slurm_params(cfg, job, ids))}")
    return "\n".join(lines)


def pueue(*args: str) -> str:
    proc = subprocess.run(["pueue", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"sweep: `pueue {shlex.join(args[:3])} ...` failed: {(proc.stderr or proc.stdout).strip()} (is `pueued -d` running?)")
    return proc.stdout.strip()


def submit_pueue(cfg: SweepConfig, jobs: list[Job]) -> dict[str, str]:
    if shutil.which("pueue") is None:
        raise SystemExit("sweep: pueue is not on PATH (install it and start `pueued -d`), or use --backend slurm")
    if cfg.pueue.group not in json.loads(pueue("group", "--json")):
        pueue("group", "add", cfg.pueue.group)
    pueue("parallel", str(cfg.pueue.parallel), "--group", cfg.pueue.group)
    ids: dict[str, str] = {}
    for job in jobs:
        ids[job.label] = pueue(*pueue_add(cfg, job, ids)[1:])
    return ids


def submit_slurm(cfg: SweepConfig, jobs: list[Job]) -> dict[str, str]:
    executor = submitit.SlurmExecutor(folder=cfg.slurm.logs or cfg.runs_dir / "slurm", max_num_timeout=0)
    ids: dict[str, str] = {}
    for job in jobs:
        executor.update_parameters(**slurm_params(cfg, job, ids))
        # subprocess.run pickles by reference, so the node needs nothing of this file; its output goes to the job's log.
        ids[job.label] = executor.submit(functools.partial(subprocess.run, list(job.argv), cwd=REPO_ROOT, check=True)).job_id
    return ids


def core_share(cfg: SweepConfig) -> int:
    """Each of `cfg.local.parallel` jobs' share of the cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)) // cfg.local.parallel)


def run_folder(cfg: SweepConfig, job: Job) -> Path | None:
    """The folder a `run:` job trains into (its label names it); None for any other job."""
    return cfg.runs_dir / job.label.removeprefix("run:") if job.label.startswith("run:") else None


def local_argv(cfg: SweepConfig, job: Job) -> tuple[str, ...]:
    """A job's command as the local backend runs it: runs and evals get their share of the cores as
    grader workers (unless --train-flags / --eval-flags set --grader-workers), and a run whose
    folder has a checkpoint resumes from it (one whose folder has none starts afresh: set_aside)."""
    argv = job.argv
    if job.label.startswith(("run:", "eval:")) and "--grader-workers" not in map(flag_of, argv):
        argv = (*argv, "--grader-workers", str(core_share(cfg)))
    folder = run_folder(cfg, job)
    if folder is not None and checkpoints(folder):
        argv = (*argv, "--resume", str(folder))
    return argv


def set_aside(cfg: SweepConfig, job: Job, state: Path) -> None:
    """A run's folder without a checkpoint (its start was stopped or killed before the first one)
    moved to RUNS/local/<label>.unstarted[.N]/, where it is kept, not deleted: the run then starts
    as a new one. Resumed instead, it would start from step 0 all the same, but without writing
    vhack.json (a resume records no quality gate), and train.py refuses to start a new run into a
    folder that exists."""
    folder = run_folder(cfg, job)
    if folder is None or not folder.exists() or checkpoints(folder):
        return
    name = f"{job.label.replace(':', '_')}.unstarted"
    aside, n = state / name, 1
    while aside.exists():
        aside, n = state / f"{name}.{n}", n + 1
    folder.rename(aside)
    print(f"{time.strftime('%H:%M:%S')} {job.label}: its folder has no checkpoint, moved to {aside}; starting afresh", flush=True)


def local_env(cfg: SweepConfig) -> dict[str, str]:
    """A job's environment: torch's intra-op threads at its share of the cores, unless
    OMP_NUM_THREADS is set. Jobs at a thread per core each thrash: 2-3x slower CPU training on 2
    cores, ~20x slower v_hack quality reports (RESEARCH_JOURNAL.md, 2026-12-05)."""
    return {"OMP_NUM_THREADS": str(core_share(cfg))} | dict(os.environ)


def stop(procs: dict[str, subprocess.Popen], grace: float = 60) -> None:
    """SIGTERM each job's process group, then SIGKILL what is left `grace` seconds later (one
    deadline for all: not `grace` per job). A run's grader workers, in sessions of their own,
    exit when its pipes to them close."""
    for proc in procs.values():
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def submit_local(cfg: SweepConfig, jobs: list[Job]) -> dict[str, str]:
    """Run the jobs here, `cfg.local.parallel` at a time, each once what it waits for has succeeded;
    returns label -> done | failed | skipped (a dependency failed) | stopped | pending. A job that
    succeeded leaves RUNS/local/<label>.done and is not run again (v_hack diagnoses aside: cheap cache hits
    that every later job needs on this machine); each job's output goes to RUNS/local/<label>.log."""
    state = cfg.runs_dir / "local"
    state.mkdir(parents=True, exist_ok=True)
    marker = lambda label, ext: state / f"{label.replace(':', '_')}.{ext}"
    status = {j.label: "done" for j in jobs if not j.label.startswith("diagnose:") and marker(j.label, "done").exists()}
    deadline = time.time() + cfg.local.hours * 3600 if cfg.local.hours else float("inf")
    running: dict[str, subprocess.Popen] = {}
    try:
        while True:
            for label, proc in list(running.items()):
                if proc.poll() is not None:
                    status[label] = "done" if proc.returncode == 0 else "failed"
                    if proc.returncode == 0:
                        marker(label, "done").touch()
                    print(f"{time.strftime('%H:%M:%S')} {label}: {status[label]}" + (f" (exit {proc.returncode}, see {marker(label, 'log')})" if proc.returncode else ""), flush=True)
                    del running[label]
            for job in jobs:
                if job.label not in status and any(status.get(a) in ("failed", "skipped") for a in job.after):
                    status[job.label] = "skipped"
            ready = [j for j in jobs if j.label not in status and j.label not in running and all(status.get(a) == "done" for a in j.after)]
            for job in ready[: cfg.local.parallel - len(running)]:
                set_aside(cfg, job, state)
                with marker(job.label, "log").open("a") as log:
                    running[job.label] = subprocess.Popen(local_argv(cfg, job), cwd=REPO_ROOT, env=local_env(cfg), stdout=log, stderr=subprocess.STDOUT,
                                                          start_new_session=True)
            if not running or time.time() > deadline:
                break
            time.sleep(1)
    finally:  # the deadline, Ctrl-C or an error here: no job outlives the sweep
        stop(running)
        status |= dict.fromkeys(running, "stopped")
    return {j.label: status.get(j.label, "pending") for j in jobs}


def sweep(cfg: SweepConfig) -> dict[str, str]:
    """Plan, check and queue (or print) the sweep; returns job label -> task or job id."""
    if cfg.runs_dir is None:
        cfg = replace(cfg, runs_dir=OUT / "sweeps" / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = replace(cfg, runs_dir=cfg.runs_dir.resolve())
    jobs = plan(cfg)
    check(cfg, jobs)
    if cfg.dry_run:
        print(describe(cfg, jobs))
        return {}
    if cfg.backend == "local":
        status = submit_local(cfg, jobs)
        left = [label for label, s in status.items() if s != "done"]
        print(f"{len(jobs) - len(left)}/{len(jobs)} jobs done" + (f"; not done: {', '.join(f'{label} ({status[label]})' for label in left)}" if left else "")
              + f"; run folders and logs in {cfg.runs_dir}" + ("; the same command resumes" if left else ""))
        if left:
            sys.exit(3 if all(status[label] in ("stopped", "pending") for label in left) else 1)
        return status
    ids = (submit_pueue if cfg.backend == "pueue" else submit_slurm)(cfg, jobs)
    width = max(map(len, ids))
    print("\n".join(f"{label:<{width}}  {ids[label]}" for label in ids))
    print(f"queued {len(jobs)} jobs on {cfg.backend}; run folders and the results go to {cfg.runs_dir}")
    return ids


if __name__ == "__main__":
    argv = sys.argv[1:]
    reported(lambda: sweep(tyro.cli(SweepConfig, args=argv)), argv)
