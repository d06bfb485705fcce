"""
The README's G-effect figures: all seven methods on forget05 of the built-in set, the G-effect
measured at every step, with the KL regularizer and without one.

    python benchmarks/geffect_figures.py             # 7.6 minutes, one thread on 2 busy cores; writes docs/geffect_*.png

Runs go to out/figures/<method>-<reg>; the plots are docs/geffect_kl.png and docs/geffect_none.png,
plus a JSON summary of the curves (docs/geffect_summary.json).
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import figures  # noqa: E402
from geffect import GROUPS  # noqa: E402

METHODS = ["ga", "wga", "npo", "tnpo", "wtnpo", "po", "rmu"]


def main():
    summary = {}
    (ROOT / "docs").mkdir(exist_ok=True)
    for reg in ("kl", "none"):
        runs = []
        for m in METHODS:
            out = ROOT / "out" / "figures" / f"{m}-{reg}"
            subprocess.run([sys.executable, f"{m}.py", "--split", "forget05", "--reg", reg, "--geffect-every", "1",
                            "--log-every", "1", "--out", str(out), "--overwrite"], cwd=ROOT, check=True)
            rows, log = figures.read_run(out)
            summary[f"{m}-{reg}"] = dict(
                unlearn_total=[r["unlearn"]["total"] for r in rows], retain_total=[r["retain"]["total"] for r in rows],
                unlearn_groups={g: sum(r["unlearn"][g] for r in rows) for g in GROUPS},
                retain_groups={g: sum(r["retain"][g] for r in rows) for g in GROUPS},
                forget_nll=[x["forget_nll"] for x in log], retain_nll=[x["retain_nll"] for x in log])
            runs.append(out)
        figures.geffect(runs, ROOT / "docs" / f"geffect_{reg}.png", symlog=True)
    (ROOT / "docs" / "geffect_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for k, s in summary.items():
        print(f"{k:12s} sum e_u {sum(s['unlearn_total']):+.3e}  sum e_r {sum(s['retain_total']):+.3e}  "
              f"first e_u {s['unlearn_total'][0]:+.2e} e_r {s['retain_total'][0]:+.2e}  "
              f"shallow/deep |e_u| {abs(s['unlearn_groups']['shallow']) / max(abs(s['unlearn_groups']['deep']), 1e-30):.1f}")


if __name__ == "__main__":
    main()
