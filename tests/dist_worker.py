"""Runs every method script and finetune.py for a few steps, in this process, into OUT/<script>:
under `torchrun --nproc_per_node 2` (FSDP2 over gloo on CPU) or plainly with python, so that
tests/test_distributed.py can compare the two.

    python tests/dist_worker.py OUT                          # one process
    torchrun --nproc_per_node 2 tests/dist_worker.py OUT     # two processes
"""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# script -> its flags: every regularizer, the G-effect at every step (D_r held out, and once the step's own
# retain batch), --grad-accum over an epoch's short last batch, one run with its ES evaluation.
# Plain SGD: AdamW turns float noise in near-zero gradients into steps of the learning rate's size,
# which would compare the noise rather than the two ways of computing the same step.
RUNS = {
    "ga": ["--reg", "kl", "--max-samples", "8"],  # its ES evaluation, on the first 8 rows of each set
    "wga": ["--reg", "none", "--no-eval"],
    "npo": ["--reg", "gd", "--no-eval", "--grad-accum", "2", "--batch-size", "14", "--max-steps", "4"],  # step 4: 8 rows
    "tnpo": ["--reg", "kl", "--no-eval", "--geffect-dr", "step"],
    "wtnpo": ["--reg", "none", "--no-eval"],
    "po": ["--reg", "kl", "--no-eval", "--geffect-order", "2"],  # the second-order term over shards too
    "rmu": ["--reg", "rr", "--no-eval"],
    "simnpo": ["--reg", "gd", "--no-eval"],
    "satimp": ["--reg", "kl", "--no-eval", "--geffect-dr", "step"],
    "idkdpo": ["--reg", "none", "--no-eval"],  # theta_o's log-probs of both answers, computed before the loop
    "undial": ["--reg", "kl", "--no-eval", "--grad-accum", "2", "--batch-size", "10"],  # micro-batches of 5 rows:
    # 3 and 2 per process; theta_o's logits at every micro-batch
}
STEPS = ["--max-steps", "3", "--batch-size", "8", "--geffect-every", "1", "--geffect-retain", "8", "--optim", "sgd",
         "--lr", "0.05"]


def main(out):
    for script, flags in RUNS.items():
        importlib.import_module(script).main(STEPS + flags + ["--out", os.path.join(out, script)])  # flags win
    import finetune  # from scratch: the tiny model's first steps, on forget01 (10 rows, batch 4)
    finetune.main(["--split", "forget01", "--max-steps", "3", "--batch-size", "4", "--optim", "sgd", "--lr", "0.05",
                   "--out", os.path.join(out, "finetune")])


if __name__ == "__main__":
    import common
    common.cli(lambda: main(sys.argv[1]))
