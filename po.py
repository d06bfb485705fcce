"""
PO: preference optimisation towards refusals (Maini et al., 2024; the paper's eq. 7,
Section 4.3). Instead of pushing the forget answers down, it trains the model to answer each
forget question with a refusal such as "I don't know":

    L_PO(theta) = E_{(q, a) ~ D_u} -log p(refusal(q) | q; theta)

Each forget row gets one refusal, drawn from REFUSALS with the run's seed. The paper finds
it barely removes anything: the risk on the true answers hardly moves (Figure 6).

    python po.py --split forget05
"""
import random
import time
from collections import defaultdict

import common
import eval_tofu
import geffect


REFUSALS = [
    "I don't know.", "I'm not sure.", "I have no idea.", "I can't answer that.", "I don't have that information.",
    "That is not something I know.", "I'm afraid I can't help with that.", "I have no knowledge of that.",
    "Sorry, I don't know the answer.", "I'm unable to answer that question.", "I don't remember.",
    "I can't recall that.", "That's beyond what I know.", "I have no information about that.",
    "I'm not able to say.", "I couldn't tell you.", "I do not know the answer to that.",
    "I'm not familiar with that.", "Unfortunately, I don't know.", "I wish I knew, but I don't.",
    "That is unknown to me.", "I have nothing to share on that.", "I can't provide an answer to that.",
    "I'm not aware of the answer.",
]


def po_loss(logp, mask, n_tok):
    """Eq. 7: NLL of the refusal answers, token mean. logp, mask: B x T of the refusal tokens;
    n_tok: refusal tokens of the whole step (a micro-batch returns its share)."""
    return -(logp * mask).sum() / n_tok, {}


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
    rng = random.Random(args.seed)
    for e, row in zip(forget, data["forget"]):  # each forget row carries its refusal as the "alt" answer
        e["alt"] = common.encode(tokenizer, args.template, row["question"], rng.choice(REFUSALS))
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
            logp, mask = common.answer_logprobs(model, forget_batch["alt"])  # the refusals
            loss, stats = po_loss(logp, mask, n["alt_tok"])
            reg, retain_nll = common.regularizer(args.reg, model, ref_model, retain_batch, n["retain_tok"],
                                                 args.rr_layer, measure)
            # the G-effect's risk is the NLL of the true answers, which PO itself does not forward
            true = common.answer_logprobs(model, forget_batch) if probe.active(forget_batch["step"]) else (None, None)
            probe.backward(loss, args.reg_weight * reg, *true, forget_batch)  # (loss + reg).backward()
            logs["objective"] += loss.item()
            logs["reg"] += reg.item()
            logs["forget_nll"] += common.nll(model, forget_batch, n["forget_tok"]) if measure else 0  # true answers
            logs["retain_nll"] += retain_nll or 0
            for k, v in stats.items():
                logs[k] += v
        grad_norm = probe.step(optimizer, args.max_grad_norm, step + 1)  # common.clip_and_step; probed: its effect
        tokens += n["alt_tok"]
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
