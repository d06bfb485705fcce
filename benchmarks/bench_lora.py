"""
LoRA against full unlearning on a Llama-style model of about 160 M parameters built locally (random
weights: what is measured is memory and time, not unlearning): trainable parameters, peak host
memory and the time of an optimizer step, WGA with the KL regularizer, in fresh processes.

    python benchmarks/bench_lora.py                    # ~6 minutes on 2 CPU cores -> docs/lora.json
    python benchmarks/bench_lora.py --repeats 5 --steps 6

Each configuration runs wga.py in its own process; its peak resident memory (ru_maxrss) is read
in that process after the run. Step time is the run's loop time (summary.json, loading and the
reference's one-off work excluded) over its steps, the median of --repeats runs, full and LoRA
interleaved. The reference model's cost is measured as the difference between --reg kl (which
needs theta_o) and --reg gd (which does not): a second copy of the model for full unlearning,
nothing for LoRA, whose reference is the same weights with the adapters off.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=12, max_position_embeddings=512)

CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
import wga
out = wga.main({argv!r})
summary = json.load(open(str(out) + "/summary.json"))
print("RESULT " + json.dumps(dict(rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  seconds=summary["seconds"], steps=summary["steps"])))
"""


def build(folder):
    """A random Llama of SIZE with the tiny preset's tokenizer (its ids fit the larger vocabulary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import common
    tok = common.load_tokenizer(common.model_path("tiny"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **SIZE))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(folder, tmp, lora, reg, steps, batch):
    argv = ["--model", folder, "--data", "builtin", "--split", "forget01", "--reg", reg, "--max-steps", str(steps),
            "--batch-size", str(batch), "--no-eval", "--no-save", "--lr", "1e-5", "--out", f"{tmp}/run", "--overwrite"]
    argv += ["--lora-r", str(lora)] if lora else []
    p = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), argv=argv)], capture_output=True, text=True,
                       cwd=ROOT)
    if p.returncode:
        sys.exit(f"bench_lora: the run failed:\n{p.stderr[-2000:]}")
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    trainable = next((x for x in p.stdout.splitlines() if x.startswith("LoRA ")), None)
    res = json.loads(line[7:])
    res["step_s"] = res["seconds"] / res["steps"]
    if trainable:  # "LoRA r=8 alpha=32 on all-linear: 3.539M of 165.59M parameters train"
        res["trainable"] = float(trainable.split(": ")[1].split("M")[0]) * 1e6
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="forget rows (and retain rows) per step")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--out", default=str(ROOT / "docs" / "lora.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = f"{tmp}/llama"
        n_params = build(folder)
        print(f"built a Llama of {n_params / 1e6:.1f}M parameters", flush=True)
        runs = {k: [] for k in ("full-kl", "lora-kl")}
        for i in range(a.repeats):  # interleaved: the machine's load falls on both alike
            for key, lora in (("full-kl", 0), ("lora-kl", a.r)):
                runs[key].append(run(folder, tmp, lora, "kl", a.steps, a.batch))
                print(key, i, runs[key][-1], flush=True)
        gd = {key: run(folder, tmp, lora, "gd", a.steps, a.batch) for key, lora in (("full-gd", 0), ("lora-gd", a.r))}
        print(gd, flush=True)
    med = {k: statistics.median(r["step_s"] for r in v) for k, v in runs.items()}
    rss = {k: max(r["rss_mb"] for r in v) for k, v in runs.items()} | {k: v["rss_mb"] for k, v in gd.items()}
    res = dict(size=SIZE, params=n_params, lora_r=a.r, trainable=runs["lora-kl"][0]["trainable"], batch=a.batch,
               steps=a.steps, repeats=a.repeats, step_s=med, step_s_all={k: [r["step_s"] for r in v] for k, v in runs.items()},
               step_ratio=med["lora-kl"] / med["full-kl"], peak_rss_mb=rss,
               reference_mb=dict(full=rss["full-kl"] - rss["full-gd"], lora=rss["lora-kl"] - rss["lora-gd"]),
               threads=os.environ.get("OMP_NUM_THREADS"))
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
