"""
Does anything in the G-effect go with robustness? Per objective, at its defaults on forget05 of the built-in set
(the same runs: each script's main command, seed 0), the G-effect of unlearning summed over the 20 steps with KL
(docs/geffect_summary.json for the paper's seven, docs/geffect_new.json for the four newer ones) beside what
the attacks gave back (docs/robustness_builtin.json, benchmarks/robustness.py), and Spearman's rank correlation
of each G-effect measure with each attack measure over the objectives.

    python benchmarks/robustness_geffect.py            # reads the three files, prints two tables
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sweep  # noqa: E402


def main():
    from scipy.stats import spearmanr
    g = {**json.loads((ROOT / "docs" / "geffect_summary.json").read_text()),
         **json.loads((ROOT / "docs" / "geffect_new.json").read_text())}
    rob = {r["method"]: r for r in json.loads((ROOT / "docs" / "robustness_builtin.json").read_text())["rows"]}
    rows = []
    for m in sweep.METHODS:
        if f"{m}-kl" not in g or m not in rob:
            continue
        groups = g[f"{m}-kl"]["unlearn_groups"]
        size = sum(abs(v) for v in groups.values())
        r, a = rob[m], rob[m]["attack"]
        q4 = [x for x in a["attacks"] if x["attack"] == "quantize" and x["bits"] == 4]
        rows.append(dict(method=m, e_u=sum(groups.values()), front=(abs(groups["embed"]) + abs(groups["shallow"])) / size,
                         deep=abs(groups["deep"]) / size,
                         relearn=r["es_v_relearnt"] - r["control_es_v_relearnt"], recovery=r["recovery"],
                         quant=q4[0]["es_exact_unlearn"] - a["before"]["unlearned"]["es_exact_unlearn"] if q4 else None,
                         privleak=r["privleak"]))
    f = lambda v: "n/a" if v is None else f"{v:.4g}"
    print("| method | Σ e_u | share of \\|e_u\\| in the embedding and shallow third | in the deep third | ES V relearnt "
          "(S 20) − control | recovery | ES 4-bit − ES unlearned | PrivLeak |")
    print("| --- " * 8 + "|")
    for r in rows:
        print(f"| {sweep.NAMES[r['method']]} | {f(r['e_u'])} | {r['front']:.3f} | {r['deep']:.3f} | {f(r['relearn'])} | "
              f"{f(r['recovery'])} | {f(r['quant'])} | {f(r['privleak'])} |")
    print(f"\nSpearman's rho over the {len(rows)} objectives (p-value):\n")
    attacks = ("relearn", "recovery", "quant", "privleak")
    print("| G-effect measure | " + " | ".join(attacks) + " |")
    print("| --- " * (len(attacks) + 1) + "|")
    for gm in ("e_u", "front", "deep"):
        cells = []
        for am in attacks:
            pairs = [(r[gm], r[am]) for r in rows if r[am] is not None]
            rho, p = spearmanr(*zip(*pairs))
            cells.append(f"{rho:+.2f} ({p:.2f})")
        print(f"| {gm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
