"""
How often the paper's G-effect tells the truth about the real step: all seven methods on forget05
of the built-in set, with KL and without a regularizer, 20 steps, every step measured with
--geffect-order 2. For each run and each risk (D_u, D_r):

- sign agreement: the share of steps where the sign of a prediction (the paper's -lr*e, the real
  update's grad R . step, the second-order value) is the sign of the actual change of R;
- rank correlation (Spearman) over the steps between each prediction and the actual change;
- the steps where the paper's sign is wrong;
- the size: the median over the steps of |actual| / |prediction| and of |prediction - actual| / |actual|.

    python benchmarks/geffect_delta.py               # 14 runs, 10.7 minutes, one thread on 2 busy cores -> docs/geffect_delta.{json,png}
    python benchmarks/geffect_delta.py --from-runs   # the summary and the figure again, from the runs in out/

Runs go to out/figures/delta-<method>-<reg>. The figure (`python figures.py delta RUN...`) has the
layout of the paper's Figure 3, one column per method: the actual change of R(D_u) (red) and of R(D_r)
(blue), solid, with the paper's prediction (dotted) and the real update's (dashed) over it.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import median

from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import figures  # noqa: E402
from geffect_paper_figures import shrink  # noqa: E402  (benchmarks/, this script's folder)

METHODS = ["ga", "wga", "npo", "tnpo", "wtnpo", "po", "rmu"]
PREDICTIONS = ("gradient", "update", "second_order")


def summarise(rows):
    if not rows or any("second_order" not in r.get("delta", {}).get("unlearn", {}) for r in rows):
        raise SystemExit("every geffect.jsonl row needs delta.*.second_order: run without --from-runs")
    out = {}
    for d in ("unlearn", "retain"):
        actual = [r["delta"][d]["actual"] for r in rows]
        rec = dict(actual=actual)
        for k in PREDICTIONS:
            pred = [r["delta"][d][k] for r in rows]
            rec[k] = pred
            rec[f"{k}_sign_agreement"] = sum((p > 0) == (a > 0) for p, a in zip(pred, actual)) / len(rows)
            rec[f"{k}_spearman"] = float(spearmanr(pred, actual).statistic)
            rec[f"{k}_size"] = median([abs(a) / abs(p) for p, a in zip(pred, actual) if p])  # actual / predicted
            rec[f"{k}_error"] = median([abs(p - a) / abs(a) for p, a in zip(pred, actual) if a])
        for k in ("gradient", "update"):
            rec[f"{k}_wrong_steps"] = [r["step"] for r in rows if (r["delta"][d][k] > 0) != (r["delta"][d]["actual"] > 0)]
        out[d] = rec
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-runs", action="store_true", help="summarise the runs already in out/figures/")
    args = parser.parse_args()
    results, runs = {}, []
    for reg in ("kl", "none"):
        for m in METHODS:
            out = ROOT / "out" / "figures" / f"delta-{m}-{reg}"
            if not args.from_runs:
                subprocess.run([sys.executable, f"{m}.py", "--split", "forget05", "--reg", reg, "--geffect-every", "1",
                                "--geffect-order", "2", "--no-eval", "--no-save", "--out", str(out), "--overwrite"],
                               cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            rows, _ = figures.read_run(out)
            runs.append(out)
            results[(m, reg)] = summarise(rows)
            u, r = results[(m, reg)]["unlearn"], results[(m, reg)]["retain"]
            print(f"{m:6s} {reg:4s} sign agreement of -lr e: D_u {u['gradient_sign_agreement']:.2f} "
                  f"D_r {r['gradient_sign_agreement']:.2f} | of the update: D_u {u['update_sign_agreement']:.2f} "
                  f"D_r {r['update_sign_agreement']:.2f}", flush=True)
    docs = ROOT / "docs"
    tmp = docs / "geffect_delta.json.tmp"
    tmp.write_text(json.dumps({f"{m}-{reg}": v for (m, reg), v in results.items()}, indent=1) + "\n")
    os.replace(tmp, docs / "geffect_delta.json")
    shrink(figures.delta(runs, docs / "geffect_delta.png"))  # a column per method, a row per --reg
    lines = ["| method | reg | risk | sign agreement: -lr e / update / 2nd order | Spearman: -lr e / update / 2nd order "
             "| \\|actual\\| / \\|-lr e\\| | error of update / 2nd order | wrong sign: -lr e / update |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (m, reg), s in results.items():
        for d in ("unlearn", "retain"):
            x = s[d]
            lines.append(f"| {m.upper()} | {reg} | {'D_u' if d == 'unlearn' else 'D_r'} | "
                         + " / ".join(f"{x[f'{k}_sign_agreement']:.2f}" for k in PREDICTIONS) + " | "
                         + " / ".join(f"{x[f'{k}_spearman']:.2f}" for k in PREDICTIONS) + " | "
                         + f"{x['gradient_size']:.3g} | {x['update_error']:.2f} / {x['second_order_error']:.2f} | "
                         + " / ".join(", ".join(map(str, x[f"{k}_wrong_steps"])) or "none" for k in ("gradient", "update"))
                         + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
