"""
Benchmark of eval_tofu.py on the tiny model. Extraction Strength (the default: EOS left out, so
decoding must reproduce the answer's tokens but need not stop): the one teacher-forced pass
against greedy generation on the same rows, values compared one by one, with two references: the
test's (tests/test_eval.py: `generate` from k = 0, 1, ... answer tokens given, each try stopped at its
first wrong token, until one reproduces the rest: the cheapest honest generation reference), and
the definition read literally (`generate` the whole rest from every prefix length). Then the wall
time of the whole evaluation command on forget05 (all metrics, all rows, FQ against out/tiny/retain95).
`rows_strictly_between` counts the rows where ES is neither 0 nor 1, the ones where the comparison
can tell a wrong k* from a right one; `mean_es_with_eos` is the one-pass mean under --es-eos.

    python benchmarks/bench_eval.py            # ~2 minutes on 2 idle CPU cores (more if a model must be built)
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


def es_every_prefix(model, tokenizer, e):
    """The definition read literally: greedy `generate` of the whole rest (EOS left out) from every prefix length."""
    n0 = e["labels"].count(-100)
    y = e["input_ids"][n0:]
    y = y[:-1] if y[-1] == tokenizer.eos_token_id else y  # an EOS generated early ends the output short: a miss
    ok = []
    for k in range(len(y)):
        ids = torch.tensor([e["input_ids"][:n0 + k]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(y) - k,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        ok.append(out[0, ids.shape[1]:].tolist() == y[k:])
    return 1 - min([k for k, good in enumerate(ok) if good] + [len(y)]) / max(len(y), 1)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    path = common.model_path("tiny")
    eval_tofu.tiny_retain_model("forget05")  # built once, outside the timings
    tok, model = common.load_tokenizer(path), common.load_model(path, frozen=True)
    res = dict(threads=torch.get_num_threads(), cpus=os.cpu_count(), load_avg_at_start=os.getloadavg()[0])
    rows = common.load_tofu("forget05_perturbed")
    for name, question in (("ES-exact", "question"), ("ES-perturb", "paraphrased_question")):
        ex = common.encode_rows(tok, common.QA_TEMPLATE, rows, question=question)
        fast_t, ref_t = [], []
        for _ in range(5):  # interleaved, so that both see the same load on a shared machine
            t, fast = timed(lambda: eval_tofu.score(model, tok, ex)[1])
            fast_t.append(t)
            t, ref = timed(lambda: [es_by_generation(model, tok, e) for e in ex])
            ref_t.append(t)
        naive_t, naive = timed(lambda: [es_every_prefix(model, tok, e) for e in ex])
        f, r = statistics.median(fast_t), statistics.median(ref_t)
        res[f"{name} forget05 ({len(ex)} rows)"] = dict(
            one_pass_s=round(f, 4), generation_s=round(r, 3), speedup=round(r / f, 1), identical=fast == ref,
            every_prefix_s=round(naive_t, 2), speedup_every_prefix=round(naive_t / f, 1),
            identical_every_prefix=fast == naive, mean_es=round(sum(fast) / len(fast), 4),
            rows_strictly_between=sum(0 < v < 1 for v in fast),
            mean_es_with_eos=round(eval_tofu.mean(eval_tofu.score(model, tok, ex, with_eos=True)[1]), 4))
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):  # the command as a user runs it: start-up, loading, every pass, FQ, writing
            t0 = time.time()
            subprocess.run([sys.executable, "eval_tofu.py", "--model", "tiny", "--split", "forget05", "--out",
                            f"{tmp}/eval.json"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            walls.append(round(time.time() - t0, 1))
        d = json.load(open(f"{tmp}/eval.json"))
    res["full evaluation forget05 (python eval_tofu.py --model tiny --split forget05)"] = dict(
        wall_s=walls, median_s=statistics.median(walls), rows=d["rows"],
        row={k: round(v, 4) for k, v in d["summary"].items()})
    res["load_avg_at_end"] = os.getloadavg()[0]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
