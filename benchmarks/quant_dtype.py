"""
The size of one difference from Zhang et al.'s code (docs/differences.md): it loads a model in 4 bits with
torch_dtype=bfloat16, so the layers left in floating point (embeddings, norms, the output layer) and the
activations are bfloat16, where attack.py keeps the project's float32 on a CPU. For each model, 4-bit with
either dtype (8-bit: the authors' load gives no dtype, float32, as here): ES-exact and ES-perturb on the
forget split, ES-exact on the held-out retain rows.

    python benchmarks/quant_dtype.py --models out/tiny/full out/wga-tiny-forget05
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import attack  # noqa: E402
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="model folders (the original, the unlearned)")
    p.add_argument("--split", default="forget05")
    args = p.parse_args()
    split = common.split_data(args.split)
    sets = dict(forget=common.load_tofu(f"{args.split}_perturbed"), retain=split["retain_eval"])
    print("| model | 4-bit, dtype | ES-exact unlearn | ES-perturb unlearn | ES-exact retain |\n| --- | --- | --- | --- | --- |")
    for path in args.models:
        tok, model = attack.load(path)
        for dtype in (torch.float32, torch.bfloat16):
            m = attack.measure_forget(attack.quantize(model, 4, dtype), tok, sets, common.QA_TEMPLATE)
            print(f"| {path} | {str(dtype).removeprefix('torch.')} | " + " | ".join(f"{v:.4f}" for v in m.values()) + " |")


if __name__ == "__main__":
    main()
