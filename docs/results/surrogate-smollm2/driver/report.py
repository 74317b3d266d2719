"""Where each run stands: steps, hack/pass every 10 steps, seconds per phase, evals."""
import json, sys
from pathlib import Path

f = lambda v: "-" if v is None else f"{v:.2f}"
for d in sorted(p for p in Path(sys.argv[1]).iterdir() if (p / "config.json").exists()):
    rows = [json.loads(l) for l in (d / "log.jsonl").read_text().splitlines()] if (d / "log.jsonl").exists() else []
    if not rows:
        print(d.name, "no steps"); continue
    m = lambda k: sum(r[k] for r in rows if r.get(k) is not None) / len(rows)
    print(d.name, "steps", len(rows), "s/step %.1f gen %.1f grade %s learn %.1f" % (m("time/step"), m("time/gen"), f(m("time/grade")) if "time/grade" in rows[0] else "-",
          sum(r["time/learn_ranks"][0] for r in rows) / len(rows)), "peak", f(max(max(r["memory/peak_gib_ranks"]) for r in rows)))
    print("   hack_s", " ".join(f(r["rollout/hack_s"]) for r in rows[4::5]))
    print("   gt_s  ", " ".join(f(r["rollout/gt_s"]) for r in rows[4::5]))
    for s in sorted((d / "eval").glob("*/summary.json")):
        e = json.loads(s.read_text()); print("   eval", s.parent.name, "strict %.3f loose %.3f pass %.3f n %d" % (e["hack_strict"], e["hack_loose"], e["gt_pass"], e["n"]))
