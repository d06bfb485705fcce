"""
SimNPO: simple negative preference optimisation (Fan et al., 2024, "Simplicity prevails"). NPO
without the reference model: the answer's log-likelihood is normalised by its length |y| and
shifted by a margin gamma:

    L_SimNPO(theta) = -(2/beta) E_{s_u ~ D_u} log sigmoid(-(beta/|y|) log p(y|x; theta) - gamma)

Its gradient is GA's per-token mean over each answer, reweighted per sequence by
w = 2 sigmoid((beta/|y|) log p(y|x) + gamma), which fades once the answer's mean log-likelihood falls
below -gamma/beta. The authors' TOFU settings: beta 2.5 (4.5 for forget10), gamma 0.

    python simnpo.py --split forget05
"""
import math
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

import common
import eval_tofu
import geffect


def simnpo_loss(logp, mask, beta, gamma, n_rows):
    """SimNPO's loss, minimised (the docstring's equation). logp, mask: B x T answer-token log-probs and
    mask; n_rows: forget rows of the whole step (sequence mean; a micro-batch returns its share).
    Stats: the mean sequence weight w = 2 sigmoid((beta/|y|) log p(y|x) + gamma), 1 at p = 1, gamma = 0."""
    mean_logp = (logp * mask).sum(-1) / mask.sum(-1)  # B: (1/|y|) log p(y|x), the length-normalised likelihood
    # -log sigmoid(-z) = softplus(z), z = beta * mean_logp + gamma
    loss = (2 / beta) * F.softplus(beta * mean_logp + gamma).sum() / n_rows
    w = 2 * torch.sigmoid(beta * mean_logp + gamma).detach()  # the sequence weight, for the log only
    return loss, dict(weight=(w.sum() / n_rows).item())


def main(argv=None, loaded=None):  # loaded: models already in memory (sweep.py)
    parser = common.make_parser(__doc__)
    common.add_shared_flags(parser)
    common.add_unlearn_flags(parser)
    parser.add_argument("--beta", type=float, default=None, help="inverse temperature (default: 2.5; 4.5 for "
                                                                  "forget10, the authors' TOFU settings)")
    parser.add_argument("--gamma", type=float, default=0.0, help="reward margin (the authors' TOFU setting: 0)")
    geffect.add_flags(parser)
    args = parser.parse_args(argv)
    try:
        common.resolve_flags(args)
        args.beta = (4.5 if args.split == "forget10" else 2.5) if args.beta is None else args.beta
        if not 0 < args.beta < math.inf:
            raise common.UsageError(f"--beta must be positive and finite, got {args.beta}")
        if not math.isfinite(args.gamma):
            raise common.UsageError(f"--gamma must be a finite number, got {args.gamma}")
        geffect.check_flags(args)
        args.out = common.default_out(__file__, args)
        common.check_out(args.out, args.overwrite)  # before loading: a new folder, or a run of ours
        data, tokenizer, model, ref_model = common.load_for_unlearning(
            args, reference=args.reg in ("kl", "rr"), loaded=loaded)
    except common.UsageError as e:
        common.die(str(e))
    common.set_seed(args.seed)
    device = model.device
    forget = common.encode_rows(tokenizer, args.template, data["forget"])
    retain = common.encode_rows(tokenizer, args.template, data["retain_train"])
    per_epoch, total, warmup = common.steps_for(len(forget), args)
    optimizer = common.make_optimizer(model.parameters(), args.optim, args.lr)
    run = common.Run(args.out, args)
    probe = geffect.Probe(args, model, tokenizer, data["retain_eval"], run.tmp)  # off unless --geffect-every
    print(f"{args.out}: {len(forget)} forget rows | reg {args.reg} | {total} steps | lr {args.lr:g} | {device}")

    es_before = None if args.no_eval else eval_tofu.quick_es(model, tokenizer, data, args.template,
                                                             max_samples=args.max_samples)
    # nothing to unlearn when the target model does not know the forget rows: say so before the first step
    eval_tofu.check_forget_es(model, tokenizer, data, args.template, args.min_forget_es, es_before)

    # unlearning loop
    model.train()
    t0, tokens = time.time(), 0
    batches = common.unlearn_batches(forget, retain, args, total, tokenizer.pad_token_id, device)
    for step, (micro, n) in enumerate(batches):
        lr = common.set_lr(optimizer, common.lr_at(step, total, warmup, args.lr))
        measure = (step + 1) % args.log_every == 0 or step + 1 == total
        logs = defaultdict(float)
        for forget_batch, retain_batch in micro:
            logp, mask = common.answer_logprobs(model, forget_batch)
            loss, stats = simnpo_loss(logp, mask, args.beta, args.gamma, n["forget_rows"])
            reg, retain_nll = common.regularizer(args.reg, model, ref_model, retain_batch, n["retain_tok"],
                                                 args.rr_layer, measure)
            probe.backward(loss, args.reg_weight * reg, logp, mask, forget_batch)  # (loss + reg).backward()
            logs["objective"] += loss.item()
            logs["reg"] += reg.item()
            logs["forget_nll"] -= (logp.detach() * mask).sum().item() / n["forget_tok"]
            logs["retain_nll"] += retain_nll or 0
            for k, v in stats.items():
                logs[k] += v
        grad_norm = probe.step(optimizer, args.max_grad_norm, step + 1)  # common.clip_and_step; probed: its effect
        tokens += n["forget_tok"]
        if measure:
            logs = common.all_sum(logs)  # under torchrun: the processes' shares of the step
            row = dict(loss=logs["objective"] + args.reg_weight * logs["reg"], **logs, lr=lr, grad_norm=grad_norm,
                       tok_s=tokens / (time.time() - t0))
            run.log_step(step + 1, total, row)

    probe.close()
    summary = dict(seconds=time.time() - t0, steps=total)
    if not args.no_eval:  # ES-exact of the forget rows and of the 400 held-out retain rows
        es_after = eval_tofu.quick_es(model, tokenizer, data, args.template, max_samples=args.max_samples)
        summary.update(es_before=es_before, es_after=es_after)
        print(f"ES-exact forget {es_before['forget']:.4f} -> {es_after['forget']:.4f} | "
              f"retain {es_before['retain']:.4f} -> {es_after['retain']:.4f}")
    out = run.save(model, tokenizer, extra={"summary.json": summary}, weights=not args.no_save)
    print(f"saved {out} ({summary['seconds']:.0f} s)")
    return out


if __name__ == "__main__":
    common.cli(main)
