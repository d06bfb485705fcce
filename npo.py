"""
NPO: negative preference optimisation (Zhang et al., 2024; the paper's eq. 3, Section 4.2):

    L_NPO(theta) = (2/beta) E_{s_u ~ D_u} log(1 + (p(s_u; theta) / p(s_u; theta_o))^beta)

with p(s_u) the probability of the whole answer (log-likelihood summed over its tokens) and
theta_o the original model. Its gradient is GA's, reweighted per sequence (eq. 4):
E[ w_npo grad log p(s_u) ],  w_npo = 2 p(s_u)^beta / (p(s_u)^beta + p(s_u; theta_o)^beta),
which fades once a sequence is less likely than under the original model. The paper's
default: beta 0.5.

    python npo.py --beta 0.5 --split forget05
"""
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

import common
import eval_tofu
import geffect


def npo_loss(logp, ref_logp, mask, beta, n_rows):
    """Eq. 3, minimised. logp, ref_logp, mask: B x T answer-token log-probs of the current and the
    original model; n_rows: forget rows of the whole step (sequence mean; a micro-batch returns its
    share). Stats: eq. 4's mean sequence weight w_npo (Figure 5a)."""
    log_ratio = ((logp - ref_logp) * mask).sum(-1)  # B: log p(s_u; theta) - log p(s_u; theta_o)
    loss = (2 / beta) * F.softplus(beta * log_ratio).sum() / n_rows  # log(1 + x^beta) = softplus(beta log x)
    w = 2 * torch.sigmoid(beta * log_ratio).detach()  # w_npo = 2 p^b / (p^b + p_o^b), for the log only
    return loss, dict(weight=(w.sum() / n_rows).item())


def main(argv=None, loaded=None):  # loaded: models already in memory (sweep.py)
    parser = common.make_parser(__doc__)
    common.add_shared_flags(parser)
    common.add_unlearn_flags(parser)
    parser.add_argument("--beta", type=float, default=0.5, help="inverse temperature (the paper: 0.5)")
    geffect.add_flags(parser)
    args = parser.parse_args(argv)
    try:
        common.resolve_flags(args)
        if args.beta <= 0:
            raise common.UsageError(f"--beta must be positive, got {args.beta}")
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
            loss, stats = npo_loss(logp, forget_batch["ref_logp"], mask, args.beta, n["forget_rows"])
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
