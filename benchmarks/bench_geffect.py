"""
Cost of measuring the G-effect: a method run with --geffect-every 1 (every step measured) against
the same run without it, with the default KL regularizer and without a regularizer; and the cost of
what the real step did (--geffect-order 1, the default, and 2) against the G-effect alone (order 0).

    python benchmarks/bench_geffect.py                  # tiny preset, forget05, ~20 minutes on 2 cores
    python benchmarks/bench_geffect.py --methods ga npo --repeats 5

Each configuration runs in a fresh process. Time: the median over --repeats of the seconds per
optimizer step (from log.jsonl's tokens per second), plain and measured runs interleaved.
Memory: the peak resident set size above the level right after start-up (Linux VmHWM, reset
through /proc/self/clear_refs), which on a CPU holds the models, optimizer state, activations
and the probe's buffers.
"""
import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])


def child(method, reg, every, order, steps, out):
    """Run one configuration in this process; print seconds per step and peak RSS growth (MB)."""
    import contextlib
    import io
    mod = importlib.import_module(method)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS to the current RSS
        f.write("5")
    base = rss_kb("VmRSS")
    argv = ["--reg", reg, "--max-steps", str(steps), "--epochs", "100", "--log-every", str(steps), "--out", out,
            "--geffect-every", str(every), "--geffect-order", str(order), "--no-eval", "--no-save", "--overwrite"]
    with contextlib.redirect_stdout(io.StringIO()):
        mod.main(argv)
    row = json.loads(open(Path(out) / "log.jsonl").readlines()[-1])
    tokens_per_step = row["tok_s"]  # tokens / seconds over the run; steps have equal token counts on average
    print(json.dumps(dict(tok_s=tokens_per_step, peak_mb=(rss_kb("VmHWM") - base) / 1024)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["ga", "npo", "wga"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, reg, every, order, out = args.child
        return child(method, reg, int(every), int(order), args.steps, out)
    import common
    common.model_path("tiny")
    configs = {"plain": (0, 0), "order 0": (1, 0), "order 1": (1, 1), "order 2": (1, 2)}  # (every, order)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for reg in ("kl", "none"):
                runs = {c: [] for c in configs}
                for _ in range(args.repeats):  # the configurations interleaved, each in a fresh process
                    for c, (every, order) in configs.items():
                        r = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", method,
                                            reg, str(every), str(order), f"{tmp}/{method}-{reg}-{every}-{order}"],
                                           capture_output=True, text=True, check=True)
                        runs[c].append(json.loads(r.stdout.strip().splitlines()[-1]))

                def ratio(a, b, key):  # median over the repeats of a's cost over b's, each pair run side by side
                    if key == "tok_s":
                        return statistics.median(y["tok_s"] / x["tok_s"] for x, y in zip(runs[a], runs[b]))
                    return statistics.median(x[key] for x in runs[a]) / statistics.median(y[key] for y in runs[b])
                res = dict(method=method, reg=reg, **{f"{c} tok_s": statistics.median(x["tok_s"] for x in runs[c])
                                                      for c in configs},
                           **{f"{c} peak_mb": statistics.median(x["peak_mb"] for x in runs[c]) for c in configs},
                           geffect_time=ratio("order 0", "plain", "tok_s"),
                           geffect_memory=ratio("order 0", "plain", "peak_mb"),
                           order1_time=ratio("order 1", "order 0", "tok_s"),
                           order1_memory=ratio("order 1", "order 0", "peak_mb"),
                           order2_time=ratio("order 2", "order 0", "tok_s"),
                           order2_memory=ratio("order 2", "order 0", "peak_mb"))
                results.append(res)
                print(json.dumps(res), flush=True)
    print("\n| method | reg | G-effect (order 0) / plain: time, memory | order 1 / order 0: time, memory "
          "| order 2 / order 0: time, memory |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['method']} | {r['reg']} | {r['geffect_time']:.2f}, {r['geffect_memory']:.2f} "
              f"({r['order 0 peak_mb']:.0f} / {r['plain peak_mb']:.0f} MB) | {r['order1_time']:.2f}, "
              f"{r['order1_memory']:.2f} | {r['order2_time']:.2f}, {r['order2_memory']:.2f} "
              f"({r['order 2 peak_mb']:.0f} MB) |")


if __name__ == "__main__":
    main()
