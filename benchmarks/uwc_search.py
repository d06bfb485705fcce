"""
UWC's search for lambda* three ways, side by side, on the configurations benchmarks/uwc_curves.py
measured (docs/uwc_curves.json): each configuration is unlearned once in memory as sweep.py does it,
then lambda* is searched in turn by bisection (the search before), by uwc.search with sweep.py's probes
(cut short when the target is out of reach, returning an estimate), and by uwc.search with every probe
complete. Each search starts with no batch order, as sweep.py's. Prints lambda*, the probes and the seconds of each, and
the totals (docs/tuning.md, "Where the time goes").

    OMP_NUM_THREADS=1 python benchmarks/uwc_search.py          # ~4 minutes on 2 cores
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sweep  # noqa: E402
import uwc  # noqa: E402
from uwc_curves import bisection, tiny_sweep  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curves", default=str(ROOT / "docs" / "uwc_curves.json"))
    a = p.parse_args()
    sw = tiny_sweep()
    args = sw.args
    totals = {}
    for c in json.load(open(a.curves))["configurations"]:
        s = sw.split(c["split"])
        theta_u = sw.unlearn(c["method"], c["split"], c["params"], sw.runs / "run", keep=False)
        out = {}
        for way in ("bisection", "search", "search, complete probes"):
            shortfall = {}

            def retain_es(lam):
                sw.mix(theta_u, lam)
                target = -1.0 if way.endswith("complete probes") else s["target"]
                return sweep.retain_es_probe(sw.model, sw.tokenizer, s["retain"], target, args.batch_size,
                                             args.es_eos, shortfall)[0]

            t0 = time.perf_counter()
            if way == "bisection":
                lam, probes = bisection(retain_es, s["target"])
            else:
                lam, probes = uwc.search(retain_es, s["target"], at_zero=s["before"]["es_exact_retain"])
            out[way] = (lam, len(probes), time.perf_counter() - t0)
            n, t = totals.get(way, (0, 0.0))
            totals[way] = (n + len(probes), t + out[way][2])
        print(f"{sweep.name_of(c['method'], c['split'], c['params']):28s} " + " | ".join(
            f"{w}: lam* {v[0]:.6f}, {v[1]} probes, {v[2]:.2f} s" for w, v in out.items()), flush=True)
    print(" | ".join(f"{w}: {n} probes, {t:.1f} s" for w, (n, t) in totals.items()))


if __name__ == "__main__":
    main()
