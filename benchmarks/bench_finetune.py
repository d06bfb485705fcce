"""
Benchmark of the default tiny fine-tune: wall time of `python finetune.py` (from scratch,
on the built-in set) and the share of answers the model then reproduces exactly, greedily,
from the question alone.

    python benchmarks/bench_finetune.py            # ~2 minutes on 2 CPU cores
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402


def exact_share(model, tok, rows, template):
    """Share of rows whose greedy continuation of the prompt is the answer followed by EOS."""
    exact = 0
    for e in common.encode_rows(tok, template, rows):
        prompt = torch.tensor([e["prompt_ids"]])
        want = e["input_ids"][len(e["prompt_ids"]):]
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(want) + 2,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        exact += out[0, prompt.shape[1]:].tolist()[:len(want)] == want
    return exact / len(rows)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        subprocess.run([sys.executable, "finetune.py", "--out", f"{tmp}/m", "--log-every", "1000"], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        tok, model = common.load_tokenizer(f"{tmp}/m"), common.load_model(f"{tmp}/m", frozen=True)
        split = common.split_data("forget05", "builtin")
        res = dict(finetune_wall_s=round(wall, 1), threads=torch.get_num_threads(), cpus=os.cpu_count())
        for name, rows in [("forget05", split["forget"]), ("retain_eval (400)", split["retain_eval"]),
                           ("real_authors", common.load_tofu("real_authors")),
                           ("world_facts", common.load_tofu("world_facts"))]:
            res[f"exact {name}"] = round(exact_share(model, tok, rows, common.QA_TEMPLATE), 4)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
