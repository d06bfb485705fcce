"""
Cost of measuring the G-effect: a method run with --geffect-every 1 (every step measured) against
the same run without it, with the default KL regularizer and without a regularizer.

    python benchmarks/bench_geffect.py                  # tiny preset, forget05, ~3 minutes on 2 cores
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


def child(method, reg, every, steps, out):
    """Run one configuration in this process; print seconds per step and peak RSS growth (MB)."""
    import contextlib
    import io
    mod = importlib.import_module(method)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS to the current RSS
        f.write("5")
    base = rss_kb("VmRSS")
    argv = ["--reg", reg, "--max-steps", str(steps), "--epochs", "100", "--log-every", str(steps), "--out", out,
            "--geffect-every", str(every), "--overwrite"]
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
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, reg, every, out = args.child
        return child(method, reg, int(every), args.steps, out)
    import common
    common.model_path("tiny")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for reg in ("kl", "none"):
                runs = {0: [], 1: []}
                for _ in range(args.repeats):
                    for every in (0, 1):
                        r = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", method,
                                            reg, str(every), f"{tmp}/{method}-{reg}-{every}"],
                                           capture_output=True, text=True, check=True)
                        runs[every].append(json.loads(r.stdout.strip().splitlines()[-1]))
                plain, probe = runs[0], runs[1]
                res = dict(method=method, reg=reg,
                           time_ratio=statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(plain, probe)),
                           plain_tok_s=statistics.median(a["tok_s"] for a in plain),
                           geffect_tok_s=statistics.median(b["tok_s"] for b in probe),
                           plain_peak_mb=statistics.median(a["peak_mb"] for a in plain),
                           geffect_peak_mb=statistics.median(b["peak_mb"] for b in probe))
                res["memory_ratio"] = res["geffect_peak_mb"] / res["plain_peak_mb"]
                results.append(res)
                print(json.dumps(res), flush=True)
    print("\n| method | reg | step time, G-effect every step / plain | peak RSS growth, G-effect / plain (MB) |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['method']} | {r['reg']} | {r['time_ratio']:.2f} | {r['memory_ratio']:.2f} "
              f"({r['geffect_peak_mb']:.0f} / {r['plain_peak_mb']:.0f}) |")


if __name__ == "__main__":
    main()
