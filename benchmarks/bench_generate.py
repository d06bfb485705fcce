"""
Table 1's full evaluation with eval_tofu.greedy against transformers' model.generate, side by side: some
configurations of the tiny preset are unlearned in memory as sweep.py does it (forget10, seed 0), and
each unlearned model is evaluated (eval_tofu.evaluate on sweep.py's Table 1 sets) in turn with the
generation of ROUGE-L done both ways, --repeats times each, alternating. Both must give the same
per-row values (generations, ROUGE-L, ES, probabilities, truth ratios), or it stops. Prints the medians
and their ratio per configuration (docs/tuning.md, "Where the time goes"). Then, for the model before
unlearning and each unlearned one, each set's mean ROUGE-L under TOFU's own cap, 200 tokens in all with
the batch's padded prompt (max_length), against eval_tofu's 200 new tokens (docs/differences.md).

    python benchmarks/bench_generate.py          # ~6 minutes on 2 cores
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import eval_tofu  # noqa: E402
from uwc_curves import tiny_sweep  # noqa: E402

CONFIGS = (("ga", {}), ("wga", dict(alpha=1.0)), ("npo", dict(beta=0.1)), ("rmu", dict(layer=3, c=4.0)))


@torch.no_grad()
def generate_by_transformers(model, tokenizer, examples, batch_size=64, max_new_tokens=200, bar=None):
    """eval_tofu.generate's batches, decoded by model.generate (greedy, its DynamicCache, every row to the end)."""
    texts = [""] * len(examples)
    for idx in eval_tofu.by_length([len(e["prompt_ids"]) for e in examples], batch_size):
        ids, attn = eval_tofu.left_pad([examples[i]["prompt_ids"] for i in idx], tokenizer.pad_token_id)
        T = ids.shape[1]
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for j, i in enumerate(idx):
            new = out[j, T:].tolist()
            new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
            texts[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
        if bar is not None:
            bar.update(len(idx))
    return texts


def tofu_cap_rouge(model, tokenizer, sets, template, batch_size=64, max_length=200) -> dict:
    """Each set's mean ROUGE-L recall when a batch generates max_length tokens in all, its padded prompt
    included (TOFU's generation config), in eval_tofu.generate's batches: each batch alone through
    eval_tofu.generate, capped at max_length less its longest prompt."""
    out = {}
    for name, (qa, _, _) in sets.items():
        ex = eval_tofu.common.encode_rows(tokenizer, template, qa)
        texts = [""] * len(ex)
        for idx in eval_tofu.by_length([len(e["prompt_ids"]) for e in ex], batch_size):
            cap = max_length - max(len(ex[i]["prompt_ids"]) for i in idx)
            for i, text in zip(idx, eval_tofu.generate(model, tokenizer, [ex[i] for i in idx], batch_size, cap)):
                texts[i] = text
        out[name] = statistics.mean(eval_tofu.rouge_l_recall([r["answer"] for r in qa], texts))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="forget10")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    sw = tiny_sweep()
    sets = sw.table1_sets(a.split)
    ways = dict(generate=generate_by_transformers, greedy=eval_tofu.generate)
    ratios, caps = [], {}
    for method, params in CONFIGS:
        sw.mix(sw.unlearn(method, a.split, params, sw.runs / "run", keep=False), 1.0)
        seconds, per = {w: [] for w in ways}, {}
        for _ in range(a.repeats):
            for way, fn in ways.items():
                eval_tofu.generate = fn  # what evaluate calls
                t0 = time.perf_counter()
                per[way] = eval_tofu.evaluate(sw.model, sw.tokenizer, sets, sw.template, progress=False)["per_sample"]
                seconds[way].append(time.perf_counter() - t0)
        eval_tofu.generate = ways["greedy"]
        if per["generate"] != per["greedy"]:
            sys.exit(f"{method} {params}: the two ways differ")
        med = {w: statistics.median(v) for w, v in seconds.items()}
        ratios.append(med["greedy"] / med["generate"])
        n_tok = sum(len(sw.tokenizer(g)["input_ids"]) for s in per["greedy"].values() for g in s["generation"])
        print(f"{method} {params}: same per-row values; {n_tok} generated tokens (re-encoded); "
              + ", ".join(f"{w} {med[w]:.1f} s ({', '.join(f'{x:.1f}' for x in seconds[w])})" for w in ways)
              + f"; ratio {ratios[-1]:.2f}", flush=True)
        caps[method] = ({k: statistics.mean(v["rouge"]) for k, v in per["greedy"].items()},
                        tofu_cap_rouge(sw.model, sw.tokenizer, sets, sw.template))
    print(f"median ratio greedy / generate: {statistics.median(ratios):.2f}")
    sw.mix(None, 0.0)
    res = eval_tofu.evaluate(sw.model, sw.tokenizer, sets, sw.template, progress=False)["per_sample"]
    caps["before unlearning"] = ({k: statistics.mean(v["rouge"]) for k, v in res.items()},
                                 tofu_cap_rouge(sw.model, sw.tokenizer, sets, sw.template))
    for name, (ours, tofu) in caps.items():
        print(f"ROUGE-L, {name}: " + ", ".join(f"{k} {ours[k]:.4f} (TOFU's cap {tofu[k]:.4f})" for k in ours))


if __name__ == "__main__":
    main()
