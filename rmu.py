"""
RMU: representation misdirection (Li et al., 2024; the paper's eq. 8, Section 4.3). It
pushes the hidden state of layer l at every answer position towards a fixed random vector:

    L_RMU(theta) = E_{s_u ~ D_u} mean_i (1/d) || phi_l(s_u^<i; theta) - c u ||^2,   u ~ U[0, 1)^d

The squared distance is averaged over the d hidden dimensions (a mean squared error), as in the
original RMU (Li et al.; the authors' code averages |.| over d); eq. 8 writes ||.||^2, whose sum
over d would make the objective d times stronger against the regularizer (d = 2048 for phi-1.5,
4096 for Llama-2-7B).
u is drawn once from the seed and, as the paper writes it, not normalised. --layer indexes the
model's output_hidden_states (0 = embeddings, 1 = after the first decoder layer, ...).
Defaults: phi-1.5 layer 9 with c 4, Llama-2-7B layer 21 with c 2 (the paper's Section 5);
tiny layer 3 of 6 (the middle one, which the paper prefers, Figure 7) with c 4, where c*u has
about the size of the hidden states (RMS 2.3 against 2.6).

    python rmu.py --split forget05
"""
import time
from collections import defaultdict

import torch

import common
import eval_tofu
import geffect


def rmu_loss(hidden, mask, u, c, n_tok):
    """Eq. 8: squared distance between the layer-l hidden state and c*u, averaged over the hidden
    dimensions (MSE, as the original RMU) and over answer positions. hidden: B x T x d; mask: B x (T-1),
    position t predicts token t+1, so the state at t is phi(s^<i) for answer token i = t+1; n_tok:
    answer positions of the whole step."""
    dist = (hidden[:, :-1].float() - c * u).pow(2).mean(-1)  # B x (T-1)
    return (dist * mask).sum() / n_tok, {}


def main(argv=None, loaded=None):  # loaded: models already in memory (sweep.py)
    parser = common.make_parser(__doc__)
    common.add_shared_flags(parser)
    common.add_unlearn_flags(parser)
    parser.add_argument("--layer", type=int, default=None, help="hidden state to misdirect (default: the preset's)")
    parser.add_argument("--c", type=float, default=None, help="scale of the random target (default: the preset's)")
    geffect.add_flags(parser)
    args = parser.parse_args(argv)
    try:
        common.resolve_flags(args)
        preset = common.PRESETS.get(args.model, common.OTHER)
        args.layer = preset["rmu_layer"] if args.layer is None else args.layer
        args.c = preset["rmu_c"] if args.c is None else args.c
        if args.layer is None:
            raise common.UsageError("--layer is needed for a model that is not a preset")
        if args.lora_r and args.layer == 0 and args.lora_targets == "all-linear":
            raise common.UsageError("--layer 0 is the embeddings, which the LoRA adapters leave as they are")
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
    gen = torch.Generator().manual_seed(args.seed)
    u = torch.rand(model.config.hidden_size, generator=gen).to(device)  # U[0, 1)^d, fixed for the run
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
            out = model(input_ids=forget_batch["input_ids"], attention_mask=forget_batch["attention_mask"],
                        output_hidden_states=True)
            logp, mask = common.token_logprobs(out.logits, forget_batch["labels"])
            loss, stats = rmu_loss(out.hidden_states[args.layer], mask, u, args.c, n["forget_tok"])
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
