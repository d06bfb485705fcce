"""
SatImp: saturation and importance reweighting (Yang, Wang et al., ICML 2025, "Exploring criteria of
loss reweighting to enhance LLM unlearning"). GA on every answer token, each token's log-likelihood
weighted, detached, by its confidence to the power beta1, which slows unlearning on tokens already
forgotten (as WGA), times one minus its confidence to the power beta2, which lowers the weight of
tokens the model is all but sure of:

    L_SatImp(theta) = E_{s_u ~ D_u} sum_i w_i log p(s_u^i | s_u^<i; theta),   w_i = p_i^beta1 (1 - p_i)^beta2

averaged over the step's answer tokens. beta2 = 0 is WGA with alpha = beta1. The authors' defaults:
beta1 5, beta2 0.1.

    python satimp.py --split forget05
"""
import math
import time
from collections import defaultdict

import common
import eval_tofu
import geffect


def satimp_loss(logp, mask, beta1, beta2, n_tok):
    """The docstring's equation, minimised: reweighted log-likelihood of the answer tokens, token mean.
    logp, mask: B x T; n_tok: answer tokens of the whole step (a micro-batch returns its share).
    Stats: the mean token weight, and the weights w themselves (token_weight, B x T, detached)."""
    logp_ = logp.detach()
    w = (beta1 * logp_).exp() * (-logp_.expm1()) ** beta2  # w_i = p_i^beta1 (1 - p_i)^beta2, detached
    loss = (w * logp * mask).sum() / n_tok
    return loss, dict(weight=((w * mask).sum() / n_tok).item(), token_weight=w)


def main(argv=None, loaded=None):  # loaded: models already in memory (sweep.py)
    parser = common.make_parser(__doc__)
    common.add_shared_flags(parser)
    common.add_unlearn_flags(parser)
    parser.add_argument("--beta1", type=float, default=5.0, help="power of the confidence p (the authors': 5)")
    parser.add_argument("--beta2", type=float, default=0.1, help="power of 1 - p (the authors': 0.1)")
    parser.add_argument("--log-token-weights", action="store_true",
                        help="log every forget answer's token weights at every step (RUN_DIR/token_weights.jsonl)")
    geffect.add_flags(parser)
    args = parser.parse_args(argv)
    try:
        common.resolve_flags(args)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(args, name) < math.inf:
                raise common.UsageError(f"--{name} must be >= 0 and finite, got {getattr(args, name)}")
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
            loss, stats = satimp_loss(logp, mask, args.beta1, args.beta2, n["forget_tok"])
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
