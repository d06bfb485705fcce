"""
Training throughput of each method script against a bare loop (forward, backward, AdamW) on the
same batches and model, with --reg none; and the wall time of each script's default command.

    python benchmarks/bench_methods.py                 # tiny preset, forget05, ~5 minutes on 2 cores
    python benchmarks/bench_methods.py --repeats 5 --steps 40

Throughput is answer tokens per second of the optimizer steps (model loading and the one-off
reference pass excluded), the median of --repeats runs, method and bare loop interleaved.
"""
import argparse
import contextlib
import importlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

METHODS = ["ga", "wga", "npo", "tnpo", "wtnpo", "po", "rmu"]


def bare_loop(method, steps, split):
    """forward, token-mean NLL, backward, AdamW on the batches the method script would use."""
    args = argparse.Namespace(model="tiny", data="builtin", split=split, template=common.QA_TEMPLATE, seed=0,
                              batch_size=None, grad_accum=1, trust_remote_code=False, reg="none", rr_layer=None,
                              epochs=5, max_steps=0, warmup_epochs=1)
    data, tok, model, _ = common.load_for_unlearning(args, reference=False)
    forget = common.encode_rows(tok, args.template, data["forget"])
    if method == "po":  # PO trains on refusals: the same lengths as its own batches
        import po
        import random
        rng = random.Random(0)
        forget = [common.encode(tok, args.template, r["question"], rng.choice(po.REFUSALS)) for r in data["forget"]]
    retain = common.encode_rows(tok, args.template, data["retain_train"])
    opt = common.make_optimizer(model.parameters(), "adamw", 1e-3)
    model.train()
    tokens, t0 = 0, time.time()
    for micro, n in common.unlearn_batches(forget, retain, args, steps, tok.pad_token_id, model.device):
        for forget_batch, _ in micro:
            logp, mask = common.answer_logprobs(model, forget_batch)
            (-(logp * mask).sum() / n["forget_tok"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += n["forget_tok"]
    return tokens / (time.time() - t0)


def method_run(method, steps, split, tmp):
    mod = importlib.import_module(method)
    argv = ["--reg", "none", "--split", split, "--max-steps", str(steps), "--epochs", "100", "--log-every",
            str(steps), "--out", f"{tmp}/{method}", "--overwrite"]
    with contextlib.redirect_stdout(io.StringIO()):
        mod.main(argv)
    return json.loads(open(f"{tmp}/{method}/log.jsonl").readlines()[-1])["tok_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--split", default="forget05")
    parser.add_argument("--no-wall", action="store_true", help="skip the default-command wall times")
    args = parser.parse_args()
    common.model_path("tiny")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            bare, meth = [], []
            for _ in range(args.repeats):
                bare.append(bare_loop(method, args.steps, args.split))
                meth.append(method_run(method, args.steps, args.split, tmp))
            rows.append(dict(method=method, bare_tok_s=statistics.median(bare), method_tok_s=statistics.median(meth),
                             ratio=statistics.median(m / b for m, b in zip(meth, bare))))
            if not args.no_wall:
                t0 = time.time()
                extra = ["--alpha", "5"] if method == "wga" else []
                subprocess.run([sys.executable, f"{method}.py", *extra, "--split", args.split, "--out",
                                f"{tmp}/{method}-default"], cwd=ROOT, check=True, capture_output=True)
                rows[-1]["default_wall_s"] = time.time() - t0
            print(json.dumps(rows[-1]), flush=True)
    print("\n| method | bare loop tok/s | method tok/s (--reg none) | ratio (median of pairs) | default command wall s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['bare_tok_s']:.0f} | {r['method_tok_s']:.0f} | {r['ratio']:.3f} | "
              f"{r.get('default_wall_s', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
