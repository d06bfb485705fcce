"""
What sweep.py saves against tuning by hand: a grid of WGA's alpha on forget05 (the paper's ten
values by default) run (a) as a researcher would without it, `wga.py --alpha A` then `uwc.py` on
the result, one pair of processes per value, and (b) as one `sweep.py --method wga` (Table 1's two
full evaluations included). Both are timed end to end as subprocesses, alternating, --repeats
times; the medians and their ratio go to stdout and --json.

    python benchmarks/bench_sweep.py                       # tiny preset, ~10 minutes on 2 cores
    python benchmarks/bench_sweep.py --grid 1,5 --repeats 1

Also checks that both give the same lambda* and ES-exact unlearn for every value.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*argv):
    t0 = time.time()
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def by_hand(grid, split, tmp):
    """wga.py then uwc.py per value: {alpha: (lam, ES-exact unlearn)} and the wall time."""
    t, out = 0.0, {}
    for a in grid:
        run_dir = f"{tmp}/wga-{a}"
        t += run("wga.py", "--alpha", a, "--split", split, "--out", run_dir, "--overwrite")
        t += run("uwc.py", "--model", run_dir, "--split", split, "--overwrite")
        res = json.load(open(f"{run_dir}-uwc/uwc.json"))
        out[float(a)] = (res["lam"], res["summary"]["es_exact_unlearn"])
    return out, t


def with_sweep(grid, split, tmp):
    t = run("sweep.py", "--method", "wga", "--split", split, "--grid", ",".join(grid), "--out", f"{tmp}/sweep")
    rows = json.load(open(f"{tmp}/sweep/sweep.json"))["rows"]
    return {r["params"]["alpha"]: (r["lam"], r["es_exact_unlearn"]) for r in rows}, t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="0.05,0.1,0.5,0.7,1,2,4,5,7,10", help="WGA alpha values")
    p.add_argument("--split", default="forget05")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args()
    grid = args.grid.split(",")
    hand, swept = [], []
    for k in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            a, t_hand = by_hand(grid, args.split, tmp)
            b, t_sweep = with_sweep(grid, args.split, tmp)
        assert a == b, f"the sweep and the scripts disagree: {a} vs {b}"
        hand.append(t_hand)
        swept.append(t_sweep)
        print(f"repeat {k + 1}: by hand {t_hand:.0f} s | sweep {t_sweep:.0f} s | ratio {t_sweep / t_hand:.3f}",
              flush=True)
    res = dict(grid=grid, split=args.split, repeats=args.repeats, by_hand_s=statistics.median(hand),
               sweep_s=statistics.median(swept), ratio=statistics.median(s / h for s, h in zip(swept, hand)),
               same_results=True)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
