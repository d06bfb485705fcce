"""
The README's main command over unlearning seeds: `python wga.py --alpha 5 --split forget05 --seed k`
for k = 0 .. N-1, each in a process of its own, and the spread of what it prints (forget and retain
ES-exact after unlearning; before unlearning is the same for every seed). The spread is
sweep.stats's: mean, sd, min, max.

    python benchmarks/main_seeds.py                  # 5 seeds, ~5 minutes on 2 cores
    python benchmarks/main_seeds.py --seeds 3 --json out/main_seeds.json

Runs go to out/main-seeds/seed<k> (replaced on the next run).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sweep  # noqa: E402

COMMAND = ["wga.py", "--alpha", "5", "--split", "forget05"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the per-seed values and their spread here")
    args = p.parse_args()
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    per_seed = []
    for k in range(args.seeds):
        out = ROOT / "out" / "main-seeds" / f"seed{k}"
        subprocess.run([sys.executable, *COMMAND, "--seed", str(k), "--out", str(out), "--overwrite"], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        s = json.loads((out / "summary.json").read_text())
        per_seed.append(dict(seed=k, before=s["es_before"], after=s["es_after"]))
        print(f"seed {k}: ES-exact forget {s['es_before']['forget']:.4f} -> {s['es_after']['forget']:.4f} | "
              f"retain {s['es_before']['retain']:.4f} -> {s['es_after']['retain']:.4f}", flush=True)
    spread = {k: sweep.stats([r["after"][k] for r in per_seed]) for k in ("forget", "retain")}
    for k, st in spread.items():
        print(f"{k} ES-exact after: mean {st['mean']:.4f}, sd {st['sd'] or 0:.4f}, range {st['min']:.4f}-{st['max']:.4f}"
              f" over {st['n']} seeds")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(command=" ".join(COMMAND), runs=per_seed, spread=spread), indent=1)
                                   + "\n")


if __name__ == "__main__":
    main()
