"""
GA: gradient ascent on the forget set. It minimises the log-likelihood of the forget answers,
i.e. ascends their NLL (the paper's eq. 1 and Section 4.1):

    L_GA(theta) = E_{s_u ~ D_u} log p(s_u; theta),   grad = E[ (1/p) grad p ]

the inverse confidence 1/p makes it push hardest on what is already forgotten, which is why
it removes the most and damages the rest the most (Figure 3, Figure 9c).

    python ga.py --split forget05
"""
import time
from collections import defaultdict

import common
import eval_tofu
import geffect


def ga_loss(logp, mask, n_tok):
    """Mean log-likelihood of the answer tokens (minimised). logp, mask: B x T answer-token
    log-probs and mask; n_tok: answer tokens of the whole step (token mean; a micro-batch
    returns its share). Stats: GA's mean inverse confidence 1/p (Figure 9c)."""
    loss = (logp * mask).sum() / n_tok
    inv_conf = (logp.detach().neg().exp() * mask).sum() / n_tok
    return loss, dict(inv_conf=inv_conf.item())


def main(argv=None, loaded=None):  # loaded: models already in memory (sweep.py)
    parser = common.make_parser(__doc__)
    common.add_shared_flags(parser)
    common.add_unlearn_flags(parser)
    geffect.add_flags(parser)
    args = parser.parse_args(argv)
    try:
        common.resolve_flags(args)
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
            loss, stats = ga_loss(logp, mask, n["forget_tok"])
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
