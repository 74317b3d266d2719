"""sweep.py: the jobs it plans and their dependencies (dry runs on both backends), the pueue calls it
makes (against a stand-in pueue), and a tiny sweep end to end on a one-node SLURM cluster that the
test starts on this machine (slurm-wlm and munge; skipped where they are absent)."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import ROOT
from projected_grpo.errors import UserError
from projected_grpo import sweep as sweep_module
from projected_grpo.sweep import Job, LocalConfig, PueueConfig, SlurmConfig, SweepConfig, check, flag_of, local_argv, plan, submit_local, sweep

PAIRS, NULL_PAIRS, MINIMAL_PAIRS = ROOT / "data" / "pairs.jsonl", ROOT / "data" / "pairs_null.jsonl", ROOT / "data" / "pairs_minimal.jsonl"


BUNDLED = "--problems data/problems_rl.jsonl --eval-problems data/problems_heldout.jsonl"  # `full` without `just download-data`


def parse_dry_run(out: str) -> list[dict]:
    """Label, labels waited for, command and backend options of each job printed by --dry-run."""
    jobs = []
    for line in out.splitlines()[1:]:
        if not line.startswith(" "):
            label, _, after = line.partition("  after ")
            jobs.append({"label": label, "after": after.split(", ") if after else []})
        elif line.startswith("    $ "):
            jobs[-1]["command"] = shlex.split(line[6:])
        else:
            jobs[-1]["backend"] = line.split()
    return jobs


def train_args(command: list[str]) -> list[str]:
    return command[command.index("train.py") :]


def flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


@pytest.mark.parametrize("backend", ["pueue", "slurm"])
def test_dry_run_lists_every_job_after_the_jobs_it_needs(backend, tmp_path):
    runs_dir = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "projected_grpo.sweep", "--dry-run", "--backend", backend, "--seeds", "1", "2", "--gates", "one_sided", "no_gate",
                           "--pairs", "data/pairs.jsonl", "data/pairs_minimal.jsonl", "--runs-dir", str(runs_dir), f"--train-flags=--steps 50 {BUNDLED}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = parse_dry_run(proc.stdout)
    labels = [j["label"] for j in jobs]
    assert len(set(labels)) == len(labels) and not runs_dir.exists()  # a dry run queues and writes nothing
    assert all(labels.index(a) < labels.index(j["label"]) for j in jobs for a in j["after"])  # queued after what it waits for

    # One diagnosis per pairs file, first, waiting for nothing: the command a run of `full` with these flags uses.
    diagnoses = [j for j in jobs if j["label"].startswith("diagnose:")]
    assert [j["label"] for j in diagnoses] == labels[:3] == ["diagnose:pairs", "diagnose:pairs_minimal", "diagnose:pairs_null"]
    for j, pairs in zip(diagnoses, ("data/pairs.jsonl", "data/pairs_minimal.jsonl", "data/pairs_null.jsonl")):
        assert j["after"] == [] and train_args(j["command"])[:3] == ["train.py", "diagnose", "full"] and flag(j["command"], "--v-hack.pairs") == pairs
        assert flag(j["command"], "--steps") == "50"

    # Runs: vanilla once per seed (not per gate, not per pairs file), projected and random per gate x pairs x seed, the
    # null-pairs arm (projected along pairs_null.jsonl) per gate x seed; each after its diagnosis.
    runs = [j for j in jobs if j["label"].startswith("run:")]
    grid = sorted((flag(j["command"], "--intervention"), flag(j["command"], "--gate"), flag(j["command"], "--v-hack.pairs"), flag(j["command"], "--seed")) for j in runs)
    assert grid == sorted([("vanilla", None, "data/pairs.jsonl", s) for s in "12"] + [
        (arm, gate, pairs, s) for arm in ("projected", "random") for gate in ("one_sided", "no_gate") for pairs in ("data/pairs.jsonl", "data/pairs_minimal.jsonl") for s in "12"]
        + [("projected", gate, "data/pairs_null.jsonl", s) for gate in ("one_sided", "no_gate") for s in "12"])
    for j in runs:
        cmd = j["command"]
        assert train_args(cmd)[:2] == ["train.py", "full"] and flag(cmd, "--steps") == "50"
        assert j["after"] == [f"diagnose:{Path(flag(cmd, '--v-hack.pairs')).stem}"]
        assert ("--project-update" in cmd) == (flag(cmd, "--intervention") != "vanilla")
        assert flag(cmd, "--runs-dir") == str(runs_dir) and f"run:{flag(cmd, '--run-name')}" == j["label"]

    # Each run's eval right after it, naming its folder; the results job last, after every eval.
    evals = [j for j in jobs if j["label"].startswith("eval:")]
    assert [j["label"] for j in evals] == [f"eval:{j['label'][4:]}" for j in runs]
    for j in evals:
        name = j["label"][5:]
        assert j["after"] == [f"run:{name}"] and train_args(j["command"]) == ["train.py", "eval", "--run", str(runs_dir / name)]
    assert labels[-1] == "results" and jobs[-1]["after"] == [j["label"] for j in evals]
    assert jobs[-1]["command"] == ["uv", "run", "python", "-m", "projected_grpo.results", str(runs_dir)]  # `just results`, with --python
    assert len(jobs) == 3 + 2 * len(runs) + 1

    # The backend's options carry the same dependencies (task ids / job ids stand as <label>).
    for j in jobs:
        opts = j["backend"]
        if backend == "pueue":
            assert opts[:6] == ["pueue", "add", "--group", "projected_grpo", "--label", j["label"]]
            assert opts[7:] == [f"<{a}>" for a in j["after"]] and (opts[6:7] == ["--after"]) == bool(j["after"])
        else:
            assert opts[0] == "sbatch" and f"--job-name={j['label']}" in opts and "--kill-on-invalid-dep=yes" in opts
            deps = [o for o in opts if o.startswith("--dependency=")]
            assert deps == (["--dependency=afterok:" + ":".join(f"<{a}>" for a in j["after"])] if j["after"] else [])
            assert ("--gpus-per-node=1" in opts) == (j["label"] != "results") and ("--time=1440" in opts) == (j["label"] != "results")


def test_default_sweep_is_the_preregistered_design_and_refusals(tmp_path):
    runs_dir = tmp_path / "runs"
    if not (ROOT / "data" / "leetcode" / "leetcode_train_medhard.jsonl").exists():  # a fresh clone: the dry run says what to download
        proc = subprocess.run([sys.executable, "-m", "projected_grpo.sweep", "--dry-run", "--runs-dir", str(runs_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.startswith("error: --problems") and "just download-data" in proc.stderr, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "projected_grpo.sweep", "--dry-run", "--runs-dir", str(runs_dir), f"--train-flags={BUNDLED}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = parse_dry_run(proc.stdout)
    assert proc.stdout.splitlines()[0].startswith("27 jobs (12 runs of full)")
    assert [j["label"] for j in jobs[:2]] == ["diagnose:pairs", "diagnose:pairs_null"]
    # Exactly: vanilla; projected and random with --project-update; projected with --project-update along pairs_null; seeds 1-3.
    runs = [train_args(j["command"]) for j in jobs if j["label"].startswith("run:")]
    tail, extra = ["--runs-dir", str(runs_dir)], BUNDLED.split()
    assert runs == [
        argv for s in "123" for argv in (
            ["train.py", "full", "--intervention", "vanilla", "--v-hack.pairs", "data/pairs.jsonl", "--seed", s, *tail, "--run-name", f"full_vanilla_pairs_s{s}", *extra],
            ["train.py", "full", "--intervention", "projected", "--gate", "one_sided", "--project-update", "--v-hack.pairs", "data/pairs.jsonl", "--seed", s,
             *tail, "--run-name", f"full_projected-one_sided_pairs_s{s}", *extra],
            ["train.py", "full", "--intervention", "random", "--gate", "one_sided", "--project-update", "--v-hack.pairs", "data/pairs.jsonl", "--seed", s,
             *tail, "--run-name", f"full_random-one_sided_pairs_s{s}", *extra],
            ["train.py", "full", "--intervention", "projected", "--gate", "one_sided", "--project-update", "--v-hack.pairs", "data/pairs_null.jsonl", "--seed", s,
             *tail, "--run-name", f"full_projected-one_sided_pairs_null_s{s}", *extra],
        )]
    assert all(("--project-update" in argv) == (argv[3] != "vanilla") for argv in runs)
    cfg = SweepConfig(runs_dir=runs_dir, train_flags=BUNDLED)
    jobs = plan(cfg)
    assert all(j.gpu for j in jobs[:-1]) and not jobs[-1].gpu
    check(cfg, jobs)
    # The label-shuffled control is an optional arm.
    shuffled = [j for j in plan(replace(cfg, arms=(*cfg.arms, "shuffled"), seeds=(1,))) if j.label.startswith("run:")][-1]
    assert shuffled.label == "run:full_shuffled-one_sided_pairs_s1" and shuffled.argv[shuffled.argv.index("--intervention") + 1] == "shuffled"
    for bad in ("--seed 3", "--v_hack.pairs=data/pairs_null.jsonl", "--run-name x", "--project-update"):  # set by the sweep itself
        with pytest.raises(UserError, match="the sweep sets"):
            plan(replace(cfg, train_flags=bad))
    with pytest.raises(UserError, match="share a file name"):
        plan(replace(cfg, pairs=(PAIRS, tmp_path / "pairs.jsonl")))
    with pytest.raises(UserError, match="the same run twice"):
        plan(replace(cfg, pairs=(PAIRS, NULL_PAIRS)))
    with pytest.raises(UserError, match=r"eval:full_projected-one_sided_pairs_null_s1, .* run:full_vanilla_pairs_s1 more than once \(give each seed once\)"):
        plan(replace(cfg, seeds=(1, 1)))
    for twice in ({"arms": ("vanilla", "vanilla")}, {"gates": ("one_sided", "one_sided")}):
        with pytest.raises(UserError, match=r"the same run twice \(give each arm and gate once"):
            plan(replace(cfg, **twice))
    few = tmp_path / "few.jsonl"
    few.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(UserError, match="needs at least 4 pairs"):  # its diagnose job would fail after the model pass
        check(replace(cfg, pairs=(few,)), plan(replace(cfg, pairs=(few,))))
    with pytest.raises(UserError, match="--samples-per-problem 0: must be >= 1"):
        check(cfg, plan(replace(cfg, eval_flags="--samples-per-problem 0")))
    with pytest.raises(SystemExit):  # a typo fails now, not when the job starts
        check(cfg, plan(replace(cfg, train_flags="--stepz 3")))
    (runs_dir / "full_random-one_sided_pairs_s2").mkdir(parents=True)
    with pytest.raises(UserError, match="full_random-one_sided_pairs_s2"):
        check(cfg, jobs)


def test_every_job_starts_the_sweeps_python(tmp_path):
    """--python reaches the results job too (nodes without uv); --results replaces that job's command."""
    cfg = SweepConfig(runs_dir=tmp_path, arms=("vanilla",), seeds=(1,), python=".venv/bin/python")
    jobs = plan(cfg)
    assert [j.argv[0] for j in jobs] == [".venv/bin/python"] * len(jobs)
    assert jobs[-1].label == "results" and jobs[-1].argv == (".venv/bin/python", "-m", "projected_grpo.results", str(tmp_path))
    assert plan(replace(cfg, results="just results"))[-1].argv == ("just", "results", str(tmp_path))


def test_pueue_queues_each_task_after_the_task_ids_it_needs(tmp_path, monkeypatch):
    """Against a stand-in `pueue` that records its calls, knows only the default group and answers `add` with task ids 100, 101, ..."""
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "bin" / "pueue"
    fake.parent.mkdir()
    fake.write_text(f"""#!{sys.executable}
import json, sys
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "add":
    print(99 + sum(json.loads(line)[0] == "add" for line in open({str(calls)!r})))
if sys.argv[1:] == ["group", "--json"]:
    print(json.dumps({{"default": {{"status": "Running", "parallel_tasks": 1}}}}))
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    cfg = SweepConfig(preset="smoke", seeds=(1, 2), pairs=(PAIRS, MINIMAL_PAIRS), runs_dir=tmp_path / "runs", pueue=PueueConfig(group="sweeps", parallel=2))
    ids = sweep(cfg)
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    assert made[:3] == [["group", "--json"], ["group", "add", "sweeps"], ["parallel", "2", "--group", "sweeps"]]
    adds = made[3:]
    jobs = plan(replace(cfg, runs_dir=cfg.runs_dir.resolve()))
    assert list(ids) == [j.label for j in jobs] and list(ids.values()) == [str(100 + i) for i in range(len(jobs))]
    label_of = {v: k for k, v in ids.items()}
    for job, add in zip(jobs, adds):
        assert add[:2] == ["add", "--print-task-id"] and flag(add, "--group") == "sweeps" and flag(add, "--label") == job.label
        assert flag(add, "--working-directory") == str(ROOT) and add[-2] == "--"
        after = add[add.index("--after") + 1 : -2] if "--after" in add else []
        assert [label_of[i] for i in after] == list(job.after)
        # Two tasks at a time: each GPU job sees the GPU of its pueue worker slot; the results job none.
        assert add[-1] == ("CUDA_VISIBLE_DEVICES=$PUEUE_WORKER_ID " if job.gpu else "") + shlex.join(job.argv)


# ----------------------------------------------------------------------------
# A one-node SLURM cluster on this machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=sweeptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# Finished jobs stay in slurmctld's memory for an hour: scontrol reports their state and times
# (there is no slurmdbd, so no sacct).
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged (own key and socket), slurmctld and slurmd, all in a temp folder; SLURM_CONF points
    this process (and so submitit's sbatch, and the jobs) at them. Stopped at the end."""
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"no SLURM here: {', '.join(missing)} not on PATH (`apt-get install slurm-wlm munge`, as .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs its daemons and jobs as root (SlurmUser=root)")
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    # --force: munged otherwise refuses a socket in a folder that others cannot enter (pytest's are 0700).
    subprocess.run(["munged", "--force", f"--socket={d}/munge.socket", f"--key-file={key}", f"--pid-file={d}/munged.pid",
                    f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"], check=True, timeout=30)
    conf = d / "slurm.conf"
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    conf.write_text(SLURM_CONF.format(host=host, d=d, ctld_port=free_port(), d_port=free_port(), cpus=os.cpu_count()))
    daemons = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(conf))
        try:
            for daemon in ("slurmctld", "slurmd"):
                out = open(d / f"{daemon}.out", "w")
                daemons.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            deadline = time.time() + 60
            while subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip() != "idle":
                if time.time() > deadline or any(p.poll() is not None for p in daemons):
                    pytest.fail("the test cluster did not come up:\n" + "\n".join(f"{n}: {(d / n).read_text()[-1500:]}" for n in ("slurmctld.out", "slurmd.out") if (d / n).exists()))
                time.sleep(0.5)
            yield d
        finally:
            left = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
            if left:
                subprocess.run(["scancel", *left])
                time.sleep(2)
            for p in reversed(daemons):
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if (d / "munged.pid").exists():
                os.kill(int((d / "munged.pid").read_text()), signal.SIGTERM)


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def wait_for(ids: dict[str, str], timeout: float) -> dict[str, dict[str, str]]:
    """scontrol's fields of each job (by label) once every one has ended."""
    deadline = time.time() + timeout
    while not all((info := {label: job_info(i) for label, i in ids.items()})[label]["JobState"] in DONE for label in ids):
        assert time.time() < deadline, f"jobs still not done: { {k: v['JobState'] for k, v in info.items()} }"
        time.sleep(2)
    return info


def tiny_sweep(tmp_path: Path, **changes) -> SweepConfig:
    """vanilla and projected of the smoke preset, one seed, 2 steps, each evaluated on 2 problems x 1 sample."""
    problems, pairs = tmp_path / "problems.jsonl", tmp_path / "pairs.jsonl"
    problems.write_text("".join((ROOT / "data" / "problems.jsonl").read_text().splitlines(keepends=True)[:2]))
    pairs.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:8]))
    # `just results` once results.py is in the tree; until then a stand-in that fails unless every eval summary is there.
    results = "just results" if (ROOT / "projected_grpo" / "results.py").exists() else """sh -c 'ls "$0"/*/eval/*/summary.json'"""
    return replace(SweepConfig(
        preset="smoke", arms=("vanilla", "projected"), seeds=(1,), pairs=(pairs,), runs_dir=tmp_path / "runs", backend="slurm",
        train_flags=f"--steps 2 --teacher-mix 0 --n-problems 2 --sampling.max-new-tokens 16 --cache-dir {tmp_path / 'cache'}",
        eval_flags=f"--problems {problems} --samples-per-problem 1 --max-new-tokens 8 --device cpu",
        python=sys.executable, results=results, slurm=SlurmConfig(gpus=0, cpus=1, time_min=10, results_time_min=5),
    ), **changes)


def test_tiny_sweep_end_to_end_on_slurm(slurm, tmp_path):
    cfg = tiny_sweep(tmp_path)
    ids = sweep(cfg)
    jobs = plan(replace(cfg, runs_dir=cfg.runs_dir.resolve()))
    assert list(ids) == [j.label for j in jobs] == [
        "diagnose:pairs", "run:smoke_vanilla_pairs_s1", "eval:smoke_vanilla_pairs_s1",
        "run:smoke_projected-one_sided_pairs_s1", "eval:smoke_projected-one_sided_pairs_s1", "results"]
    info = wait_for(ids, timeout=420)
    logs = cfg.runs_dir / "slurm"
    failed = {label: v["JobState"] for label, v in info.items() if v["JobState"] != "COMPLETED"}
    assert not failed, f"{failed}\n" + "\n".join(
        f"--- {label}:\n{(logs / f'{ids[label]}_0_log.err').read_text()[-2000:]}" for label in failed if (logs / f"{ids[label]}_0_log.err").exists())
    # Dependencies held: each job started once the jobs it waits for had ended (slurm times, in seconds) ...
    for job in jobs:
        assert all(info[job.label]["StartTime"] >= info[a]["EndTime"] for a in job.after), (job.label, info[job.label]["StartTime"])
    # ... and the files say the same at finer grain: v_hack and its report before each run's folder, each run's summary before its eval's.
    (v_hack,) = (tmp_path / "cache" / "v_hack").glob("*.safetensors")
    assert v_hack.with_name(v_hack.stem + ".report.json").exists()
    for name in ("smoke_vanilla_pairs_s1", "smoke_projected-one_sided_pairs_s1"):
        run = cfg.runs_dir / name
        config = json.loads((run / "config.json").read_text())
        assert config["run_name"] == name and config["intervention"] == name.split("_")[1].split("-")[0]
        assert (run / "checkpoints" / "step_000002" / "delta_S.safetensors").exists()
        assert "v_hack cache hit" in (run / "train.log").read_text()  # extracted once, by the diagnose job
        assert json.loads((run / "vhack.json").read_text())["beats_shuffled"] is not None  # the run recorded the report's verdict
        summary = run / "eval" / "problems-step_000002-run_tests-s0" / "summary.json"
        assert json.loads(summary.read_text())["n"] == 2
        assert v_hack.stat().st_mtime <= (run / "config.json").stat().st_mtime and (run / "summary.json").stat().st_mtime <= summary.stat().st_mtime
    # The results job ran last, over the sweep's runs dir.
    assert info["results"]["StartTime"] >= max(info[label]["EndTime"] for label in ids if label.startswith("eval:"))
    if "ls" in cfg.results:
        assert len((logs / f"{ids['results']}_0_log.out").read_text().split("summary.json")) == 3


def test_a_failed_job_cancels_every_job_that_waits_for_it(slurm, tmp_path):
    ids = sweep(tiny_sweep(tmp_path, python="false"))  # every train.py job exits 1 at once
    info = wait_for(ids, timeout=120)
    assert {label: v["JobState"] for label, v in info.items()} == {label: "FAILED" if label.startswith("diagnose:") else "CANCELLED" for label in ids}


def checkpoint_contents(step_dir: Path) -> tuple[dict, dict]:
    """delta_S's tensors (as raw bytes) and metadata. Not the file's bytes: safetensors writes the
    metadata map in hash order, which differs between processes."""
    with safe_open(step_dir / "delta_S.safetensors", "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}, f.metadata()


def test_tiny_sweep_runs_here_and_resumes_where_it_stopped(tmp_path):
    cfg = tiny_sweep(tmp_path, backend="local", local=LocalConfig(parallel=2))
    cfg = replace(cfg, train_flags=cfg.train_flags + " --checkpoint-every 1")
    assert set(sweep(cfg).values()) == {"done"}
    vanilla = cfg.runs_dir / "smoke_vanilla_pairs_s1"
    assert json.loads((vanilla / "eval" / "problems-step_000002-run_tests-s0" / "summary.json").read_text())["n"] == 2
    assert "v_hack cache hit" in (vanilla / "train.log").read_text()  # extracted once, by the diagnose job
    final = checkpoint_contents(vanilla / "checkpoints" / "step_000002")
    # Stopped after its step-1 checkpoint: the same command runs that run (resumed) and its eval, nothing else.
    shutil.rmtree(vanilla / "checkpoints" / "step_000002")
    for label in ("run_smoke_vanilla_pairs_s1", "eval_smoke_vanilla_pairs_s1"):
        (cfg.runs_dir / "local" / f"{label}.done").unlink()
    projected_log = (cfg.runs_dir / "local" / "run_smoke_projected-one_sided_pairs_s1.log").read_text()
    assert set(sweep(cfg).values()) == {"done"}
    assert (cfg.runs_dir / "local" / "run_smoke_projected-one_sided_pairs_s1.log").read_text() == projected_log  # not run again
    assert "resumed from" in (vanilla / "train.log").read_text()
    assert checkpoint_contents(vanilla / "checkpoints" / "step_000002") == final  # as if never stopped


def test_local_sweep_stops_its_jobs_at_the_deadline(tmp_path):
    cfg = SweepConfig(runs_dir=tmp_path, backend="local", local=LocalConfig(parallel=2, hours=2 / 3600))
    sleeper = (sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(600)'])")
    t0 = time.time()
    status = submit_local(cfg, [Job("eval:a", sleeper), Job("eval:b", sleeper, after=("eval:a",))])
    assert status == {"eval:a": "stopped", "eval:b": "pending"} and time.time() - t0 < 30
    assert subprocess.run(["pgrep", "-f", "time.sleep(600)"], capture_output=True).returncode == 1  # the job's children too


def test_local_jobs_get_their_share_of_the_cores_as_threads(tmp_path, monkeypatch):
    """Unless OMP_NUM_THREADS is set, each of `parallel` jobs gets cores // parallel intra-op threads."""
    show = (sys.executable, "-c", "import os, torch; print('threads', os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads())")
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = SweepConfig(runs_dir=tmp_path / "share", backend="local", local=LocalConfig(parallel=2))
    assert submit_local(cfg, [Job("diagnose:a", show)]) == {"diagnose:a": "done"}
    assert f"threads {share} {share}" in (tmp_path / "share" / "local" / "diagnose_a.log").read_text()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
    cfg = SweepConfig(runs_dir=tmp_path / "set", backend="local", local=LocalConfig(parallel=2))
    assert submit_local(cfg, [Job("diagnose:a", show)]) == {"diagnose:a": "done"}
    assert "threads 3 " in (tmp_path / "set" / "local" / "diagnose_a.log").read_text()  # (torch may cap it at the cores)


def test_a_users_grader_workers_is_not_overridden(tmp_path):
    """The local backend gives runs and evals their share of the cores as --grader-workers, unless the user's flags set it."""
    cfg = SweepConfig(runs_dir=tmp_path, backend="local", arms=("vanilla",), seeds=(1,), train_flags="--grader_workers=3", eval_flags="--grader-workers 5")
    argv = {j.label.split(":")[0]: local_argv(cfg, j) for j in plan(cfg)}
    assert [flag_of(a) for a in argv["run"]].count("--grader-workers") == 1 and "--grader_workers=3" in argv["run"]
    assert argv["eval"].count("--grader-workers") == 1 and flag(list(argv["eval"]), "--grader-workers") == "5"
    bare = {j.label.split(":")[0]: local_argv(replace(cfg, train_flags="", eval_flags=""), j) for j in plan(replace(cfg, train_flags="", eval_flags=""))}
    assert all(bare[kind].count("--grader-workers") == 1 for kind in ("run", "eval"))


def test_a_run_resumes_only_from_a_checkpoint_and_a_folder_without_one_is_set_aside(tmp_path):
    """A run killed before its first checkpoint left a folder (config.json, train.log, maybe no vhack.json): the
    next local sweep moves it into RUNS/local/ and starts the run as new, without --resume."""
    cfg = SweepConfig(runs_dir=tmp_path, backend="local")
    show = (sys.executable, "-c", "import sys; print('argv', sys.argv[1:])")
    job = Job("run:r", show)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text("{}")
    assert "--resume" not in local_argv(cfg, job)
    assert submit_local(cfg, [job]) == {"run:r": "done"}
    assert "--resume" not in (tmp_path / "local" / "run_r.log").read_text()
    assert not (tmp_path / "r").exists() and (tmp_path / "local" / "run_r.unstarted" / "config.json").read_text() == "{}"
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)  # again, stopped before its first checkpoint: kept beside the first
    (tmp_path / "local" / "run_r.done").unlink()
    assert submit_local(cfg, [Job("run:r", show)]) == {"run:r": "done"} and (tmp_path / "local" / "run_r.unstarted.1" / "checkpoints").is_dir()
    (tmp_path / "r" / "checkpoints" / "step_000001").mkdir(parents=True)
    assert local_argv(cfg, job)[-2:] == ("--resume", str(tmp_path / "r"))
    (tmp_path / "local" / "run_r.done").unlink()
    assert submit_local(cfg, [job]) == {"run:r": "done"} and (tmp_path / "r" / "checkpoints" / "step_000001").is_dir()  # resumed, left in place
    assert f"'--resume', '{tmp_path / 'r'}'" in (tmp_path / "local" / "run_r.log").read_text()


def test_stop_gives_all_jobs_one_grace_period(monkeypatch):
    """Jobs that ignore SIGTERM get 60 s between them, not 60 s each (fake processes and a fake clock)."""
    clock, signals = [0.0], []

    class Stubborn(subprocess.Popen):  # no process behind it
        def __init__(self, pid: int):
            self.pid = pid

        def wait(self, timeout: float) -> None:
            clock[0] += timeout  # waits its whole timeout, then is still running
            raise subprocess.TimeoutExpired("job", timeout)

    monkeypatch.setattr(sweep_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(sweep_module.os, "killpg", lambda pid, sig: signals.append((pid, sig)))
    sweep_module.stop({str(i): Stubborn(i) for i in range(3)})
    assert clock[0] == 60 and signals == [(i, signal.SIGTERM) for i in range(3)] + [(i, signal.SIGKILL) for i in range(3)]
