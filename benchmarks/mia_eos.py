"""
The size of one difference from open-unlearning's attacks (docs/differences.md): its LOSS, ZLib and
Reference average the NLL over the answer tokens and the EOS, where its Min-K% and Min-K%++ (and
eval_tofu.py's every score) leave the EOS out. For each model: the AUC of LOSS, ZLib and Reference
(against out/tiny/retainXX) both ways on the forget rows against the holdout rows, and the mean
per-row change of LOSS. open-unlearning's ZLib also compresses the decoded answer tokens
(skip_special_tokens), not the answer string: that is in the "with EOS" column too.

    python benchmarks/mia_eos.py                                   # tiny and its retain95, forget05
    python benchmarks/mia_eos.py --models out/tiny/full out/wga-tiny-forget05
"""
import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import eval_tofu  # noqa: E402


def losses(path, rows, template):
    """(LOSS without EOS as eval_tofu.py, LOSS with EOS as open-unlearning, decoded answer texts) per row."""
    tok, model = common.load_tokenizer(path), common.load_model(path, frozen=True)
    ex = common.encode_rows(tok, template, rows)
    mean_logp, _, mia = eval_tofu.score(model, tok, ex, mia_k=0.4)  # mean_logp: answer tokens and EOS
    texts = [tok.decode(e["input_ids"][e["labels"].count(-100):], skip_special_tokens=True) for e in ex]
    return mia["loss"], [-x for x in mean_logp], texts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="model folders (default: out/tiny/full and its retainXX)")
    p.add_argument("--split", default="forget05")
    args = p.parse_args()
    retain = eval_tofu.tiny_retain_model(args.split)
    models = args.models or [str(common.tiny_dir() / "full"), retain]
    forget, holdout = common.load_tofu(args.split), eval_tofu.holdout_rows(args.split, "builtin")
    rows, nf = forget + holdout, len(forget)
    ref = losses(retain, rows, common.QA_TEMPLATE)
    print(f"{args.split}: {nf} forget rows against {len(holdout)} holdout rows; Reference against {retain}\n")
    print("| model | LOSS AUC without / with EOS | ZLib AUC without / with | Reference AUC without / with "
          "| mean LOSS change, forget / holdout |\n| --- | --- | --- | --- | --- |")
    for path in models:
        mine, theirs, texts = losses(path, rows, common.QA_TEMPLATE)
        answers = [r["answer"] for r in rows]
        zl = [eval_tofu.zlib_scores(mine, answers), eval_tofu.zlib_scores(theirs, texts)]
        rf = [[a - b for a, b in zip(mine, ref[0])], [a - b for a, b in zip(theirs, ref[1])]]
        auc = lambda v: eval_tofu.auc(v[:nf], v[nf:])
        change = [statistics.mean(b - a for a, b in zip(mine[s], theirs[s])) for s in (slice(0, nf), slice(nf, None))]
        print(f"| {path} | {auc(mine):.4f} / {auc(theirs):.4f} | {auc(zl[0]):.4f} / {auc(zl[1]):.4f} | "
              f"{auc(rf[0]):.4f} / {auc(rf[1]):.4f} | {change[0]:+.4f} / {change[1]:+.4f} |")


if __name__ == "__main__":
    main()
