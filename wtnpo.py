"""
WTNPO: weighted token-wise NPO (the paper's Appendix D.2). TNPO's token weight times WGA's
confidence weight, both detached, so that unlearning also slows down on forgotten tokens:

    L_WTNPO(theta) = E_{s_u ~ D_u} sum_i w_i log p(s_u^i | s_u^<i; theta),
    w_i = p_i^alpha * 2 p_i^beta / (p_i^beta + p_o,i^beta),   p_i = p(s_u^i | s_u^<i; theta), p_o,i likewise at theta_o

alpha = 0 is TNPO. The paper's defaults: alpha 1.5; beta 5 for forget01/05, 7 for forget10.

    python wtnpo.py --split forget05
"""
import time
from collections import defaultdict

import torch

import common
import eval_tofu
import geffect


def wtnpo_loss(logp, ref_logp, mask, alpha, beta, n_tok):
    """Appendix D.2, minimised: token mean of w_i log p_i. logp, ref_logp, mask: B x T; n_tok:
    answer tokens of the whole step (a micro-batch returns its share). Stats: the mean weight, and
    the weights w themselves (token_weight, B x T, detached)."""
    w = ((alpha * logp).exp() * 2 * torch.sigmoid(beta * (logp - ref_logp))).detach()  # p^a * TNPO weight
    loss = (w * logp * mask).sum() / n_tok
    return loss, dict(weight=((w * mask).sum() / n_tok).item(), token_weight=w)


def main(argv=None, loaded=None):  # loaded: models already in memory (sweep.py)
    parser = common.make_parser(__doc__)
    common.add_shared_flags(parser)
    common.add_unlearn_flags(parser)
    parser.add_argument("--alpha", type=float, default=1.5, help="confidence power (the paper: 1.5)")
    parser.add_argument("--beta", type=float, default=None, help="inverse temperature (default: 5; 7 for forget10)")
    parser.add_argument("--log-token-weights", action="store_true",
                        help="log every forget answer's token weights at every step (RUN_DIR/token_weights.jsonl)")
    geffect.add_flags(parser)
    args = parser.parse_args(argv)
    try:
        common.resolve_flags(args)
        args.beta = (7.0 if args.split == "forget10" else 5.0) if args.beta is None else args.beta
        if args.alpha < 0 or args.beta <= 0:
            raise common.UsageError(f"--alpha must be >= 0 and --beta positive, got {args.alpha} and {args.beta}")
        geffect.check_flags(args)
        args.out = common.default_out(__file__, args)
        common.check_out(args.out, args.overwrite)  # before loading: a new folder, or a run of ours
        data, tokenizer, model, ref_model = common.load_for_unlearning(
            args, reference=True, loaded=loaded)
    except common.UsageError as e:
        common.die(str(e))
    common.set_seed(args.seed)
    device = model.device
    forget = common.encode_rows(tokenizer, args.template, data["forget"])
    retain = common.encode_rows(tokenizer, args.template, data["retain_train"])
    per_epoch, total, warmup = common.steps_for(len(forget), args)
    common.add_reference_logprobs(ref_model, forget, tokenizer.pad_token_id, device)  # once: theta_o is frozen
    if args.reg not in ("kl", "rr"):  # theta_o is not needed from here on: free its memory
        ref_model = None
        common.release()
    optimizer = common.make_optimizer(model.parameters(), args.optim, args.lr)
    run = common.Run(args.out, args)
    probe = geffect.Probe(args, model, tokenizer, data["retain_eval"], run.tmp)  # off unless --geffect-every
    token_log = geffect.TokenLog(args, tokenizer, data["forget"], run.tmp)  # off unless --log-token-weights
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
            loss, stats = wtnpo_loss(logp, forget_batch["ref_logp"], mask, args.alpha, args.beta, n["forget_tok"])
            token_log.write(forget_batch, mask, stats.pop("token_weight"))  # the weights the loss used
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
    token_log.close()
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
