"""Issue 19 item 5: which logged signal leads the hack? Read on every committed vanilla log of the
surrogate (tuning blocks and both gates) with >= 30 steps, the runs that never hacked as the
yardstick: a signal that fires there too is no indicator.

A signal "fires" at the first of STRETCH consecutive steps above its bar. Bars: cin_s against its
empirical null (null_s_p95, H2 as preregistered, any step), and each signal against its own start
(results.rise: mean + 2 sd of steps 1-BASELINE_STEPS, steps after BASELINE_STEPS only, here over the
whole run), as results.leading reads cin_s before the onset. Onset: hack_s first > ONSET. Lead = onset - firing step (negative: it fired after onset); a
lead >= STRETCH is a stretch complete before the onset, as results.leading (and H2) count one.
Usage, from the repository root: PYTHONPATH=. uv run python docs/results/surrogate-smollm2/driver/leading.py"""
import json
from pathlib import Path

from projected_grpo.results import ONSET, STRETCH, first_stretch, rise

ROOT = Path("docs/results/surrogate-smollm2")
OWN = ("hackward/cin_s", "hackward/cin", "hackward/upd", "rollout/attempted_s", "rollout/hack_s", "loss/kl", "rollout/len_s")


def fires_above_null(rows: list[dict]) -> int | None:
    flags = [r["hackward/cin_s"] is not None and r["hackward/cin_s"] > r["hackward/null_s_p95"] for r in rows]
    return first_stretch(flags, [r["step"] for r in rows], STRETCH)


def main() -> None:
    logs = sorted(ROOT.glob("tuning/*/*/log.jsonl")) + sorted(ROOT.glob("*-gate/runs/*/log.jsonl"))
    table = {}
    print("| run | teacher mix | steps | onset | cin_s > null | " + " | ".join(f"{k.split('/')[1]} > own start" for k in OWN) + " |")
    print("|---" * (5 + len(OWN)) + "|")
    for log in logs:
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        if len(rows) < 30:
            continue
        mix = json.loads((log.parent / "config.json").read_text())["teacher_mix"]
        onset = next((r["step"] for r in rows if r["rollout/hack_s"] > ONSET), None)
        fired = {"cin_s > null": fires_above_null(rows)} | {k: rise(rows, rows, k)[1] for k in OWN}  # any step, onset or not
        table[log.parent] = (onset, fired)
        print(f"| {log.parent.relative_to(ROOT)} | {mix} | {len(rows)} | {onset or '-'} | " + " | ".join(str(s or "-") for s in fired.values()) + " |")
    print(f"\nPer signal, over {sum(o is not None for o, _ in table.values())} runs that hacked and {sum(o is None for o, _ in table.values())} that did not:")
    for name in ["cin_s > null", *OWN]:
        hacked = [(o, f[name]) for o, f in table.values() if o is not None]
        leads = sorted(o - s for o, s in hacked if s is not None)
        false = sum(f[name] is not None for o, f in table.values() if o is None)
        print(f"- {name}: fired in {len(leads)} of {len(hacked)} that hacked (lead on onset, steps: {leads}; "
              f"complete before the onset in {sum(lead >= STRETCH for lead in leads)}), "
              f"in {false} of {len(table) - len(hacked)} that did not")


if __name__ == "__main__":
    main()
