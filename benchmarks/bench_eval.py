"""
Benchmark of eval_tofu.py on the tiny model: the one-pass Extraction Strength against the
generation reference of tests/test_eval.py (greedy `generate` from every prefix length, k = 0, 1, ...
until the rest is reproduced) on the same rows, values compared one by one; then the wall time of the
whole evaluation command on forget05 (all metrics, all rows, FQ against out/tiny/retain95).

    python benchmarks/bench_eval.py            # ~2 minutes on 2 CPU cores (more if a model must be built)
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import common  # noqa: E402
import eval_tofu  # noqa: E402
from test_eval import es_by_generation  # noqa: E402


def median_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    path = common.model_path("tiny")
    eval_tofu.tiny_retain_model("forget05")  # built once, outside the timings
    tok, model = common.load_tokenizer(path), common.load_model(path, frozen=True)
    res = dict(threads=torch.get_num_threads(), cpus=os.cpu_count())
    rows = common.load_tofu("forget05_perturbed")
    for name, question in (("ES-exact", "question"), ("ES-perturb", "paraphrased_question")):
        ex = common.encode_rows(tok, common.QA_TEMPLATE, rows, question=question)
        t_fast, fast = median_time(lambda: eval_tofu.score(model, tok, ex)[1], 5)
        t_ref, ref = median_time(lambda: [es_by_generation(model, tok, e) for e in ex], 3)
        res[f"{name} forget05 ({len(ex)} rows)"] = dict(
            one_pass_s=round(t_fast, 4), generation_s=round(t_ref, 2), speedup=round(t_ref / t_fast, 1),
            identical=fast == ref, mean_es=round(sum(fast) / len(fast), 4))
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):  # the command as a user runs it: start-up, loading, every pass, FQ, writing
            t0 = time.time()
            subprocess.run([sys.executable, "eval_tofu.py", "--model", "tiny", "--split", "forget05", "--out",
                            f"{tmp}/eval.json"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            walls.append(time.time() - t0)
        s = json.load(open(f"{tmp}/eval.json"))["summary"]
    res["forget05 row"] = {k: round(v, 4) for k, v in s.items()}
    res["full evaluation forget05 (python eval_tofu.py --model tiny --split forget05), wall s"] = [round(w, 1) for w in walls]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
