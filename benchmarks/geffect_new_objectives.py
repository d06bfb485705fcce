"""
The G-effect of the four newer objectives, SimNPO, SatImp, IdkDPO and UNDIAL, beside the paper's method
each is closest to (NPO, WGA, PO, GA), on forget05 of the built-in set: each script's defaults, with KL and
without a regularizer, 20 steps, every step measured (--geffect-order 1: the actual change of each risk
beside the paper's prediction -lr*e).

    OMP_NUM_THREADS=1 python benchmarks/geffect_new_objectives.py   # 16 runs, 5 min 36 s on 2 busy cores
    python benchmarks/geffect_new_objectives.py --from-runs         # summary and figures from the runs in out/

Runs go to out/figures/new/<method>-<reg>. It writes
- docs/geffect_new.png: the four, KL above and no regularizer below (`figures.py geffect`, symlog);
- docs/geffect_new_delta.png: the actual change of R(D_u) and R(D_r) against -lr*e and grad R . update, each
  new method beside its counterpart (`figures.py delta`);
- docs/geffect_new.json: per run and step e_u and e_r (total and the objective's term), their sums per layer
  group, the forget and retain NLL, the logged weight (`weight`; GA's inverse confidence `inv_conf`; UNDIAL's
  target probability `target_p`), the actual change of each risk and the paper's -lr*e, how often their signs
  agree, the median of |actual| / |-lr*e|, and ES-exact before and after (the run's summary.json).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import figures  # noqa: E402
from geffect import GROUPS  # noqa: E402
from geffect_paper_figures import shrink  # noqa: E402  (benchmarks/, this script's folder)

PAIRS = [("simnpo", "npo"), ("satimp", "wga"), ("idkdpo", "po"), ("undial", "ga")]  # new method, its counterpart
NEW = [m for m, _ in PAIRS]
RUNS_DIR = ROOT / "out" / "figures" / "new"
WEIGHTS = ("weight", "inv_conf", "target_p")  # what each script logs of its weighting, if anything


def g(x):
    return float(f"{x:.4g}")  # 4 significant digits: the JSON stays small


def objective(row, d) -> float:
    """The objective's own share of e (the total, when there is no regularizer and so no "terms")."""
    return row["terms"]["objective"][d] if "terms" in row else row[d]["total"]


def summarise(run_dir) -> dict:
    rows, log = figures.read_run(run_dir)
    if any("delta" not in r for r in rows):
        raise SystemExit(f"{run_dir}: geffect.jsonl has no delta (run without --from-runs)")
    key = next((k for k in WEIGHTS if k in log[0]), None)
    s = dict(
        e_u=[g(r["unlearn"]["total"]) for r in rows], e_r=[g(r["retain"]["total"]) for r in rows],
        e_u_objective=[g(objective(r, "unlearn")) for r in rows],
        e_r_objective=[g(objective(r, "retain")) for r in rows],
        unlearn_groups={k: g(sum(r["unlearn"][k] for r in rows)) for k in GROUPS},
        retain_groups={k: g(sum(r["retain"][k] for r in rows)) for k in GROUPS},
        forget_nll=[g(x["forget_nll"]) for x in log], retain_nll=[g(x["retain_nll"]) for x in log],
        weight_key=key, weight=[g(x[key]) for x in log] if key else None)
    for d, name in (("unlearn", "u"), ("retain", "r")):
        actual = [r["delta"][d]["actual"] for r in rows]
        pred = [r["delta"][d]["gradient"] for r in rows]  # -lr e, the paper's prediction
        upd = [r["delta"][d]["update"] for r in rows]
        s[f"dR_{name}"] = [g(a) for a in actual]
        s[f"pred_{name}"] = [g(p) for p in pred]
        s[f"sign_agreement_{name}"] = sum((p > 0) == (a > 0) for p, a in zip(pred, actual)) / len(rows)
        s[f"update_sign_agreement_{name}"] = sum((p > 0) == (a > 0) for p, a in zip(upd, actual)) / len(rows)
        s[f"spearman_{name}"] = g(spearmanr(pred, actual).statistic)
        s[f"size_{name}"] = g(median([abs(a) / abs(p) for p, a in zip(pred, actual) if p]))  # |actual| / |-lr e|
        s[f"wrong_steps_{name}"] = [r["step"] for r, p, a in zip(rows, pred, actual) if (p > 0) != (a > 0)]
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    s["es_before"], s["es_after"] = summary.get("es_before"), summary.get("es_after")
    return s


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-runs", action="store_true",
                        help="summarise and draw the runs already in out/figures/new/")
    args = parser.parse_args()
    start, results = time.time(), {}
    for reg in ("kl", "none"):
        for m in [m for pair in PAIRS for m in pair]:
            out = RUNS_DIR / f"{m}-{reg}"
            if not args.from_runs:
                t = time.time()
                subprocess.run([sys.executable, f"{m}.py", "--split", "forget05", "--reg", reg, "--geffect-every", "1",
                                "--geffect-order", "1", "--log-every", "1", "--no-save", "--out", str(out),
                                "--overwrite"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                print(f"{m}-{reg}: {time.time() - t:.0f} s", flush=True)
            results[f"{m}-{reg}"] = summarise(out)
    docs = ROOT / "docs"
    tmp = docs / "geffect_new.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, docs / "geffect_new.json")
    made = [figures.geffect([RUNS_DIR / f"{m}-{reg}" for reg in ("kl", "none") for m in NEW], docs / "geffect_new.png",
                            symlog=True),
            figures.delta([RUNS_DIR / f"{m}-{reg}" for reg in ("kl", "none") for pair in PAIRS for m in pair],
                          docs / "geffect_new_delta.png")]
    for path in made:
        shrink(path)
        print(f"{path} ({Path(path).stat().st_size / 1024:.0f} KB)")
    for k, s in results.items():
        peak = max(range(len(s["e_u"])), key=lambda i: abs(s["e_u"][i]))
        w = f"{s['weight_key']} {s['weight'][0]:.3g} -> {s['weight'][-1]:.3g}" if s["weight_key"] else "no weight"
        es = f"ES forget {s['es_after']['forget']:.4f} retain {s['es_after']['retain']:.4f}" if s["es_after"] else ""
        print(f"{k:12s} sum e_u {sum(s['e_u']):+.3e} e_r {sum(s['e_r']):+.3e} | peak |e_u| step {peak + 1}, "
              f"last/peak {abs(s['e_u'][-1]) / abs(s['e_u'][peak]):.1e} | {w} | NLL forget {s['forget_nll'][-1]:.3g} "
              f"retain {s['retain_nll'][-1]:.3g} | sign agreement D_u {s['sign_agreement_u']:.2f} "
              f"D_r {s['sign_agreement_r']:.2f} | {es}")
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
