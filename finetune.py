"""
Fine-tune a causal LM on a TOFU config: the "before unlearning" model (default `--split full`)
and, with `--split retain95` (or 99, 90), the retain-only model that Forget Quality compares
against. The loss is the mean negative log-likelihood of the answer tokens (and EOS).

    python finetune.py                                  # tiny model on the built-in set -> out/tiny/full
    python finetune.py --split retain95                 # its retain-only twin -> out/tiny/retain95
    python finetune.py --data ../shared/tofu            # on a data folder -> out/tiny/tofu-<hash>/full
    python finetune.py --model phi-1.5 --split full     # from microsoft/phi-1_5 on locuslab/TOFU (GPU)

For the tiny preset the model starts from random initialisation with a byte-level BPE
tokenizer trained on the data source, and trains until the data is memorised. Its data is
the chosen config plus the general-knowledge rows (real_authors, world_facts): they play the
part of pre-training knowledge, which no split forgets. Each data source has its own folder of
tiny models (common.tiny_dir) and, beyond the built-in set, a model sized for the real TOFU.
A progress bar shows the elapsed time and the ETA; the step lines are printed above it.
A preset build of the built-in set ends with one line that says whether its bytes are the published
ones (CHECKSUMS; the same on every Intel x86-64 CPU with AVX2: common.reproducible_cpu).
"""
import os
import time

import torch

import common

# Built-in fine-tune, measured (docs/performance.md): 98 s for 30 epochs of 39k tokens (padding
# included) at 1.8M parameters on 2 CPU cores. The estimate a build announces scales it by padded
# tokens x parameters (rough: the real TOFU's epochs ran about 25 % slower than it says, docs/real_tofu.md).
SECONDS_PER_TOKEN_PARAM = 98 / (30 * 39_054 * 1.804e6)
# What the tokenizer of another data source learns from: every config a run or an evaluation reads.
TOKENIZER_CONFIGS = ("full", "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
                     "real_authors", "world_facts", "real_authors_perturbed", "world_facts_perturbed")


# SHA-256 of model.safetensors of the built-in set's preset builds, made with the pinned versions (constraints.txt)
# and common.reproducible_cpu's arithmetic: the same bytes on any x86-64 CPU with AVX2 (docs/reproducibility.md).
CHECKSUMS = dict(full="9dde17e2c96e3918d79abd010b48c709883419457299dcf62fdf4d02800d18dc",
                 retain99="52bd0b019805fbe2cff1a7decb0c1971d5a82c88b807131ee5e13c1465bd8c6c",
                 retain95="05dce4a45b240b0007f85047705ea22f08c9c0e8b1c10bd404b52de231818c54",
                 retain90="bcf4141226669fb97e541be5e62dfcdf362d6b56b39647fa2064f35b587fe5bb")
PUBLISHED = dict(torch="2.13.0+cpu", transformers="5.24.0", tokenizers="0.23.3", cpu_kernels="AVX2",
                 mkl_cbwr="AVX2,STRICT", cpu_vendor="GenuineIntel")  # common.arithmetic() of the builds above


def sha256(path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_line(path, split) -> str:
    """Whether a preset build of the built-in set has the published bytes (CHECKSUMS), in one line."""
    got, want = sha256(os.path.join(path, "model.safetensors")), CHECKSUMS[split]
    if got == want:
        return f"model.safetensors SHA-256 {got}: the published bytes (docs/reproducibility.md)"
    now = common.arithmetic()
    diff = ", ".join(f"{k} {now[k]} (published: {v})" for k, v in PUBLISHED.items() if str(now[k]) != v)
    return (f"model.safetensors SHA-256 {got} differs from the published {want}: "
            + (f"this build has {diff}" if diff else "same versions and kernels, so another kind of CPU")
            + "; the numbers of docs/ are the published model's (docs/reproducibility.md)")


def tokenizer_rows(data):
    """The rows the tiny tokenizer is trained on: the whole built-in set, or TOKENIZER_CONFIGS of
    another source (those a folder has), the same for every model of that source."""
    if data == "builtin":
        import fictitious
        return [r for rs in fictitious.generate().values() for r in rs]
    have = lambda c: not os.path.isdir(data) or any(os.path.isfile(os.path.join(data, c + e)) for e in (".json", ".jsonl"))
    return [r for c in TOKENIZER_CONFIGS if have(c) for r in common.load_tofu(c, data)]


def tiny_tokenizer(rows, vocab=2048):
    """A byte-level BPE tokenizer of `vocab` tokens trained on the rows' text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [f"Question: {r['question']}\nAnswer: {r[k]}" for r in rows for k in ("answer", "paraphrased_answer")
             if k in r] + [p for r in rows for p in r.get("perturbed_answer", [])]
    texts += [r["paraphrased_question"] for r in rows if "paraphrased_question" in r]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model(tokenizer, seed, size=common.TINY_SIZES["builtin"]):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, **{k: v for k, v in size.items() if k != "vocab"})
    return LlamaForCausalLM(config)


def parse(argv=None):
    """finetune.py's flags, resolved (common.resolve_flags); raises UsageError."""
    parser = common.make_parser(__doc__)
    common.add_shared_flags(parser, split="full")
    return common.resolve_flags(parser.parse_args(argv), finetune=True)


def main(argv=None):
    try:
        common.init_distributed()  # under torchrun (a no-op otherwise)
        args = parse(argv)
        if args.model == "tiny" and args.lora_r:
            raise common.UsageError("--lora-r adapts a pre-trained model: the tiny preset starts from random "
                                    "weights (and its folder is every tiny run's target model)")
        # only the tiny preset's own build goes where the other scripts look for the preset's model
        mark, custom = None, ""
        preset_dir = common.tiny_dir(args.data) / args.split
        if args.model == "tiny":
            mark = dict(script="finetune.py", recipe=common.tiny_recipe(args))
            custom = common.recipe_differs(mark["recipe"], common.preset_recipe(args.data, args.split))
        if args.out is None and args.model == "tiny":
            src = "" if args.data == "builtin" else f"-{common.source_slug(args.data)}"
            args.out = str(common.OUT / f"finetune-tiny{src}-{args.split}" if custom else preset_dir)
        elif args.out is None:
            args.out = str(common.OUT / f"finetune-{args.model.replace('/', '_')}" / args.split)
        elif common.inside(args.out, common.tiny_dir("builtin")) and (
                args.model != "tiny" or custom or os.path.realpath(args.out) != os.path.realpath(preset_dir)):
            why = (f"this build sets {custom}" if custom else f"this build's folder is {preset_dir}"
                   if args.model == "tiny" else f"this build starts from {args.model}")
            raise common.UsageError(f"--out {args.out} is where the tiny preset keeps its models, which only "
                                    f"its own builds write ({why}): choose another --out")
        rows = common.load_tofu(args.split, args.data)
        if args.model == "tiny":  # general knowledge, learnt alongside (see the docstring)
            rows += common.load_tofu("real_authors", args.data) + common.load_tofu("world_facts", args.data)
        if args.batch_size > len(rows):
            raise common.UsageError(f"--batch-size {args.batch_size} is larger than the {len(rows)} training rows")
        common.set_seed(args.seed)
        if args.model == "tiny":  # from scratch, with a tokenizer trained on the data source
            size = common.tiny_size(args.data)
            tokenizer = tiny_tokenizer(tokenizer_rows(args.data), size["vocab"])
            model = tiny_model(tokenizer, args.seed, size)
        else:
            base = common.PRESETS[args.model]["base"] if args.model in common.PRESETS else args.model
            tokenizer = common.load_tokenizer(base, args.trust_remote_code)
            model = common.load_model(base, args.trust_remote_code, lora=args)  # placed (sharded under torchrun)
        examples = common.encode_rows(tokenizer, args.template, rows)
        per_epoch, total, warmup = common.steps_for(len(examples), args)
    except common.UsageError as e:
        common.die(str(e))
    if args.model == "tiny":
        model = common.place(model)
    device = common.device_and_dtype()[0]
    optimizer = common.make_optimizer(model.parameters(), args.optim, args.lr)
    run = common.Run(args.out, args, mark)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    estimate = ""
    if args.model == "tiny" and device.type == "cpu":  # scaled from the measured built-in fine-tune
        padded = sum(max(len(examples[i]["input_ids"]) for i in idx) * len(idx)  # what a padded epoch computes
                     for idx in common.epoch_batches(len(examples), args.batch_size, args.seed, 0))
        seconds = total / per_epoch * padded * n_params * SECONDS_PER_TOKEN_PARAM
        estimate = f" | about {max(1, round(seconds / 60))} min on 2 CPU cores"
    print(f"finetune {args.model} on {args.split} ({len(examples)} rows, {args.data}) | {n_params / 1e6:.2f}M params"
          f"{f' ({n_train / 1e6:.3f}M trainable, LoRA r={args.lora_r})' if args.lora_r else ''} | "
          f"{total} steps | lr {args.lr:g} | {device}{estimate}", flush=True)
    if custom and common.is_main():
        print(f"not the tiny preset's build ({custom}): it goes to {args.out}, never to the preset's model", flush=True)

    # training loop, under a progress bar with elapsed time and ETA; the step lines are printed above it
    from tqdm import tqdm
    bar = tqdm(total=total, desc=f"finetune {args.split}", unit="step", disable=not common.is_main(),
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")
    model.train()
    t0 = time.time()
    step, tokens = 0, 0
    while step < total:
        for idx in common.epoch_batches(len(examples), args.batch_size, args.seed, step // per_epoch):
            if step >= total:
                break
            lr = common.set_lr(optimizer, common.lr_at(step, total, warmup, args.lr))
            batch_examples = [examples[i] for i in idx]
            n_tok = common.n_answer(batch_examples)
            loss_sum = 0.0
            for part in common.chunks(batch_examples, min(args.grad_accum, len(idx))):  # exact token mean of the batch
                batch = common.collate(common.shard(part), tokenizer.pad_token_id, device)
                logp, mask = common.answer_logprobs(model, batch)
                loss = -(logp * mask).sum() / n_tok
                loss.backward()
                loss_sum += loss.item()
            norm = common.clip_and_step(model, optimizer, args.max_grad_norm, step + 1)
            step, tokens = step + 1, tokens + n_tok
            bar.update()
            if step % args.log_every == 0 or step == total:
                loss_sum = common.all_sum(dict(loss=loss_sum))["loss"]  # under torchrun: the processes' shares
                tps = tokens / (time.time() - t0)
                run.log(dict(step=step, loss=loss_sum, lr=lr, grad_norm=norm, tok_s=tps))
                if common.is_main():
                    bar.write(f"step {step}/{total} | loss {loss_sum:.4f} | lr {lr:.2e} | grad {norm:.2f} | "
                              f"tok/s {tps:.0f}")
    bar.close()
    out = run.save(model, tokenizer, extra={"summary.json": dict(seconds=time.time() - t0, steps=total)})
    print(f"saved {out} ({time.time() - t0:.0f} s)")
    if mark and not custom and args.data == "builtin" and args.split in CHECKSUMS and common.is_main():
        print(checksum_line(out, args.split), flush=True)
    return out


if __name__ == "__main__":
    common.cli(main)
