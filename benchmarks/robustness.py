"""
The attacks at the objectives' defaults on forget05 (docs/robustness.md): every objective's main command (the
paper's defaults, KL) on the tiny model of the data, then attack.py (relearning on other authors, S = 2, 5, 10, 20,
and 8- and 4-bit quantization, each with its control) and eval_tofu.py's membership inference (PrivLeak against
the retain-only model). One process per step, as a user would run them.

    python benchmarks/robustness.py                                  # the built-in set, all eleven
    python benchmarks/robustness.py --data ../shared/tofu            # the real TOFU: its tiny model and retain-only
    python benchmarks/robustness.py --data ../shared/tofu --methods ga,npo,wga   # model are built on first use
                                                                     # (about 30 minutes each)

Runs go to out/robustness/<data>/<method>/ (replaced on the next run); the table is printed and written with every
number to docs/robustness_<data>.json (builtin, or the data folder's name).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sweep  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="builtin", help="builtin, or a folder of TOFU's configs")
    p.add_argument("--methods", default=",".join(sweep.METHODS), help="comma-separated method scripts")
    p.add_argument("--split", default="forget05")
    p.add_argument("--json", default=None, help="default: docs/robustness_<data>.json")
    p.add_argument("--jobs", type=int, default=1, help="methods run side by side (each its own processes)")
    p.add_argument("--collect", action="store_true", help="run nothing: the table from the methods' folders already "
                                                          "made (those with attack.json and eval.json)")
    args = p.parse_args()
    slug = "builtin" if args.data == "builtin" else Path(args.data).resolve().name
    args.json = args.json or str(ROOT / "docs" / f"robustness_{slug}.json")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in sweep.METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]}")
    t0 = time.time()

    def one(m):
        out = ROOT / "out" / "robustness" / slug / m
        t = time.time()
        run = lambda *cmd: subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, check=True,
                                          stdout=subprocess.DEVNULL)
        if args.collect:
            if not ((out / "attack.json").is_file() and (out / "eval.json").is_file()):
                return None
        else:
            run(f"{m}.py", "--split", args.split, "--data", args.data, "--out", out, "--overwrite", "--no-eval")
            run("attack.py", "--model", out)
            run("eval_tofu.py", "--model", out, "--max-new-tokens", "8")  # ROUGE-L (so MU) is cut short: not reported
        a, e = json.loads((out / "attack.json").read_text()), json.loads((out / "eval.json").read_text())
        relearn = {x["steps"]: x for x in a["attacks"] if x["attack"] == "relearn"}
        quant = {x["bits"]: x for x in a["attacks"] if x["attack"] == "quantize"}
        last = max(relearn)
        row = dict(method=m, es_exact_unlearn=e["metrics"]["forget"]["es_exact"],
                   es_exact_retain=e["metrics"]["retain"]["es_exact"], privleak=e["privleak"],
                   es_v=a["before"]["unlearned"]["es_exact_v"], es_v_original=a["before"]["original"]["es_exact_v"],
                   es_v_relearnt=relearn[last]["es_exact_v"], control_es_v_relearnt=relearn[last]["control_es_exact_v"],
                   recovery=relearn[last]["recovery"], relearn_steps=last,
                   **{f"es_exact_{b}bit": quant[b]["es_exact_unlearn"] for b in quant},
                   **{f"control_es_exact_{b}bit": quant[b]["control_es_exact_unlearn"] for b in quant},
                   seconds=round(time.time() - t, 1), attack=a, mia={k: v["auc"] for k, v in e["mia"].items()
                                                                       if isinstance(v, dict) and "auc" in v})
        print(f"{m}: ES forget {row['es_exact_unlearn']:.4f} retain {row['es_exact_retain']:.4f} | V {row['es_v']:.4f}"
              f" -> S{last} {row['es_v_relearnt']:.4f} (control {row['control_es_v_relearnt']:.4f}) | 4-bit "
              f"{row.get('es_exact_4bit', float('nan')):.4f} | PrivLeak {row['privleak']:.2f} | {row['seconds']} s",
              flush=True)
        return row

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads that wait on subprocesses
        results = [r for r in pool.map(one, methods) if r is not None]
    Path(args.json).write_text(json.dumps(dict(data=args.data, split=args.split, seconds=round(time.time() - t0, 1),
                                               rows=results), indent=1) + "\n")
    f = lambda v: "n/a" if v is None else f"{v:.4f}"
    print("\n| method | ES-exact forget | ES-exact retain | ES V | ES V relearnt | control | recovery | ES 8-bit | "
          "ES 4-bit | control 4-bit | PrivLeak |")
    print("| --- " * 11 + "|")
    for r in results:
        print(f"| {sweep.NAMES[r['method']]} | {f(r['es_exact_unlearn'])} | {f(r['es_exact_retain'])} | {f(r['es_v'])} | "
              f"{f(r['es_v_relearnt'])} | {f(r['control_es_v_relearnt'])} | {f(r['recovery'])} | "
              f"{f(r.get('es_exact_8bit'))} | {f(r.get('es_exact_4bit'))} | {f(r.get('control_es_exact_4bit'))} | "
              f"{r['privleak']:.2f} |")


if __name__ == "__main__":
    main()
