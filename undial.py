"""
UNDIAL: unlearning by self-distillation with adjusted logits (Dong et al., NAACL 2025). At every
answer token the target is the frozen original model's next-token distribution with the answer
token's logit lowered by beta, and the model is trained towards it by cross-entropy:

    q_t = softmax(z_t(theta_o) - beta * onehot(y_t))
    L_UNDIAL(theta) = E_t H(q_t, p_t(theta)) = -E_t sum_v q_t,v log p_t,v(theta)

averaged over the step's answer tokens. The gradient in the logits is p_t - q_t: bounded, and zero
once the model matches the target, which keeps the original model's distribution over the other
tokens. Unlike GA's, the objective has a minimum. Default: beta 10.

    python undial.py --split forget05
"""
import math
import time
from collections import defaultdict

import torch

import common
import eval_tofu
import geffect


def undial_loss(logits, ref_logits, labels, beta, n_tok):
    """The docstring's equation, minimised. logits, ref_logits: B x T x V of the current and the original
    model; labels: B x T, -100 off the answer (position t predicts token t+1, as common.token_logprobs);
    n_tok: answer tokens of the whole step (a micro-batch returns its share). Stats: the mean
    probability the target q_t leaves on the answer token."""
    targets = labels[:, 1:]
    mask = targets != -100
    up = lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # softmax in fp32 at least
    z = up(ref_logits[:, :-1]).detach()
    idx = targets.clamp(min=0).unsqueeze(-1)  # off the answer any index will do: masked below
    z = z.scatter_add(-1, idx, torch.full_like(idx, -beta, dtype=z.dtype))  # z_ref - beta * onehot(y_t)
    q = z.softmax(-1)  # the target, detached: the original model's, adjusted
    ce = -(q * up(logits[:, :-1]).log_softmax(-1)).sum(-1)  # B x (T-1): H(q_t, p_t)
    q_answer = q.gather(-1, idx).squeeze(-1)
    return (ce * mask).sum() / n_tok, dict(target_p=((q_answer * mask).sum() / n_tok).item())


def main(argv=None, loaded=None):  # loaded: models already in memory (sweep.py)
    parser = common.make_parser(__doc__)
    common.add_shared_flags(parser)
    common.add_unlearn_flags(parser)
    parser.add_argument("--beta", type=float, default=10.0, help="how far the answer token's logit is lowered "
                                                                   "in the target (default: 10)")
    geffect.add_flags(parser)
    args = parser.parse_args(argv)
    try:
        common.resolve_flags(args)
        if not 0 < args.beta < math.inf:
            raise common.UsageError(f"--beta must be positive and finite, got {args.beta}")
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
            inputs = dict(input_ids=forget_batch["input_ids"], attention_mask=forget_batch["attention_mask"])
            logits = model(**inputs).logits
            logp, mask = common.token_logprobs(logits, forget_batch["labels"])  # for the log and the G-effect
            with torch.no_grad():
                ref_logits = ref_model(**inputs).logits  # the original model's, each step: V numbers per token
            loss, stats = undial_loss(logits, ref_logits, forget_batch["labels"], args.beta, n["forget_tok"])
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
