"""
UWC's search assumes that the held-out retain ES-exact falls as lambda grows (docs/uwc.md). This
measures it: for configurations of a sweep folder whose lambda* was below 1, the configuration is
unlearned again in memory (as sweep.py does it, same seed, same weights) and its retain ES-exact is
computed completely at lambda = k / --points for every k, and at every probe of the search. It reports
each curve's rises (a step up of more than one row's ES) and whether uwc.search's lambda* equals a plain
bisection's (the search before it interpolated), with the probes each made.

    python benchmarks/uwc_curves.py out/sweep/tiny                  # 12 configurations, ~15 min on 2 cores
    python benchmarks/uwc_curves.py out/sweep/tiny --per-split 1 --points 8

Writes --json (default docs/uwc_curves.json): the curves, the rises and both searches' probes.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import sweep  # noqa: E402
import uwc  # noqa: E402

METHODS = ("ga", "npo", "wga", "rmu", "simnpo", "undial")


def bisection(retain_es, target: float):
    """The search as uwc.py made it before: lambda = 1, then halving [0, 1] down to 0.01, 8 probes at most."""
    lams = [1.0]
    if retain_es(1.0) >= target:
        return 1.0, lams
    lo, hi = 0.0, 1.0
    while hi - lo > 0.01:
        mid = round((lo + hi) / 2, 6)
        lams.append(mid)
        lo, hi = (mid, hi) if retain_es(mid) >= target else (lo, mid)
    return lo, lams


def tiny_sweep() -> sweep.Sweep:
    """sweep.py's in-memory runner at its defaults (tiny preset, built-in set, seed 0), its configurations' logs
    in a temporary folder that goes with the process, never in a sweep's own folder."""
    args = argparse.Namespace(model="tiny", data=None, tol=None, batch_size=64, es_eos=False, seed=0, lr=None,
                              epochs=None, keep=False, grid=None, wtnpo_alpha=None, rmu_layers=None, min_forget_es=0.3)
    sw = sweep.Sweep(args)
    sw.scratch = tempfile.TemporaryDirectory(prefix="uwc-bench-")  # removed when sw is
    sw.runs = Path(sw.scratch.name)
    return sw


def chosen(rows: list, per_split: int) -> list:
    """Per split, up to `per_split` configurations with lambda* < 1, one method each, spread over METHODS."""
    out = []
    for split in common.SPLITS:
        taken = 0
        for m in METHODS:
            cands = [r for r in rows if r["split"] == split and r["method"] == m and r["lam"] < 1]
            if cands and taken < per_split:
                out.append(cands[len(cands) // 2])
                taken += 1
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a sweep's folder (its sweep.json: which configurations, with their lambda*)")
    p.add_argument("--per-split", type=int, default=4)
    p.add_argument("--points", type=int, default=32, help="the curve at lambda = k / points, k = 0..points")
    p.add_argument("--json", default=str(ROOT / "docs" / "uwc_curves.json"))
    a = p.parse_args()
    rows = json.load(open(Path(a.folder) / "sweep.json"))["rows"]
    sw = tiny_sweep()
    args = sw.args
    out = []
    for row in chosen(rows, a.per_split):
        t0 = time.time()
        s = sw.split(row["split"])
        theta_u = sw.unlearn(row["method"], row["split"], row["params"], sw.runs / "run", keep=False)
        cache = {}

        def es(lam):  # complete, never cut short: the value itself
            if lam not in cache:
                sw.mix(theta_u, lam)
                cache[lam] = sweep.retain_es_probe(sw.model, sw.tokenizer, s["retain"], -1.0, args.batch_size,
                                                   args.es_eos, {})[0]
            return cache[lam]

        curve = [(k / a.points, es(k / a.points)) for k in range(a.points + 1)]
        step = 1 / len(s["retain"])  # one row's ES is at most this much of the mean
        rises = [(l0, l1, e1 - e0) for (l0, e0), (l1, e1) in zip(curve, curve[1:]) if e1 - e0 > step]
        lam_b, probes_b = bisection(es, s["target"])
        lam_s, probes_s = uwc.search(es, s["target"], at_zero=s["before"]["es_exact_retain"])
        probes_s = [q["lam"] for q in probes_s]
        out.append(dict(method=row["method"], split=row["split"], params=row["params"], target=s["target"],
                        lam_sweep_json=row["lam"], lam_bisection=lam_b, lam_search=lam_s, probes_bisection=probes_b,
                        probes_search=probes_s, curve=curve, rises=rises, seconds=round(time.time() - t0, 1)))
        print(f"{sweep.name_of(row['method'], row['split'], row['params']):28s} lam* bisection {lam_b:.6f} "
              f"search {lam_s:.6f} (sweep.json {row['lam']:.6f}) | probes {len(probes_b)} -> {len(probes_s)} | "
              f"rises above one row: {len(rises)}" + "".join(f" [{l0:.3f}->{l1:.3f} +{d:.4f}]" for l0, l1, d in rises),
              flush=True)
    agree = sum(r["lam_bisection"] == r["lam_search"] for r in out)
    mono = sum(not r["rises"] for r in out)
    print(f"{len(out)} configurations: lambda* equal in {agree}; curves without a rise above one row at 1/{a.points}: "
          f"{mono}; probes below lambda 1: bisection {sum(len(r['probes_bisection']) for r in out)}, "
          f"search {sum(len(r['probes_search']) for r in out)}")
    sweep.atomic_text(Path(a.json), json.dumps(dict(points=a.points, configurations=out), indent=1) + "\n")


if __name__ == "__main__":
    main()
