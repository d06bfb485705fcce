"""
Attacks on an unlearned model: do the forgotten answers come back? Each attack works on a copy of the
model in memory (the folder is never touched), which is evaluated before and after, next to a control
that shows what the attack does to a model that never held the answers.

Relearning (Deeb & Roger 2024, "Do unlearning methods remove information from language model weights?").
--seed cuts the forget split's authors into two halves, T (relearnt) and V (evaluated); in TOFU and the
built-in set an author is a block of consecutive rows (--author-rows: 20 in TOFU, 10 in the built-in set).
The model is fine-tuned on T's question-answer pairs (AdamW at the preset's fine-tune learning rate,
constant; the answer tokens' mean NLL, as finetune.py) for S steps, for each S of --relearn-steps, going
on from one S to the next. After each S: ES-exact and ES-perturb on V, ES-exact on the 400 held-out
retain rows, and the Min-K%++ AUC of V against the holdout rows. V's authors are independent of T's, so
what comes back on V was still in the weights. The control relearns the retain-only model (which never
saw a forget author) the same way: its ES on V is what T alone teaches about V. Per S,

    recovery = (ES_V after - ES_V unlearned) / (ES_V original - ES_V unlearned)     (ES-exact on V)

Where the unlearned model climbs above the control, the knowledge was hidden, not removed.
--relearn-on same-authors: T is half of every forget author's questions, V the other half.

Quantization (Zhang et al., ICLR 2025, "Catastrophic failure of LLM unlearning via quantization"):
the model's linear layers in 8 and 4 bits (--quant-bits) by bitsandbytes, through transformers'
BitsAndBytesConfig as the authors' code loads a model (LLM.int8; 4-bit FP4 in blocks of 64; the output
layer stays as it is); ES-exact and ES-perturb on the forget split, ES-exact on the retain rows, and the
fraction of quantized weights whose code is the original model's (an update smaller than a quantization
level leaves it). The control: the original model under the same quantization.

    python attack.py --model out/wga-tiny-forget05                       # -> out/wga-tiny-forget05/attack.json
    python attack.py --model RUN --relearn-on same-authors --relearn-steps 1,2,4 --quant-bits none

--original (the model before unlearning) defaults to the run's args.json model, the retain-only model to
the tiny preset's retainXX of the data (another model without --retain-model: no relearning control);
--split, --data and --template to the run's, as in eval_tofu.py. A LoRA run's folder holds the merged
model: that is what is attacked (every weight relearns). The table is printed; attack.json (beside the
model, or --out) holds every number, and attack-relearn.png beside it ES-exact on V against S
(figures.py relearn), the control dashed.
"""
import contextlib
import math
import os
import random
import time

import torch

import common
import eval_tofu

RELEARN_ON = ("other-authors", "same-authors")
QUANT_BITS = (8, 4)


# ----------------------------------------------------------------------------- T and V

def author_split(n_rows: int, author_rows: int, seed: int, on: str = "other-authors") -> tuple:
    """(T, V): sorted row indices of a forget split of n_rows rows, `author_rows` consecutive rows to an author.
    other-authors: the authors shuffled by `seed`, the first half (rounded down) to T, the rest to V.
    same-authors: every author's rows shuffled by `seed`, half of them (rounded down) to T, the rest to V."""
    rng = random.Random(seed)
    authors = [list(range(a * author_rows, (a + 1) * author_rows)) for a in range(n_rows // author_rows)]
    T = []
    if on == "other-authors":
        order = list(range(len(authors)))
        rng.shuffle(order)
        T = [i for a in order[:len(authors) // 2] for i in authors[a]]
    else:
        for rows in authors:
            rows = list(rows)
            rng.shuffle(rows)
            T += rows[:author_rows // 2]
    return sorted(T), sorted(set(range(n_rows)) - set(T))


def check_split(n_rows: int, author_rows: int, on: str, split: str):
    """Raise UsageError unless the forget split cuts into whole authors and into two non-empty halves."""
    if n_rows % author_rows:
        raise common.UsageError(f"{split} has {n_rows} rows, not a whole number of authors of --author-rows "
                                f"{author_rows}")
    if on == "other-authors" and n_rows // author_rows < 2:
        raise common.UsageError(f"{split} has {n_rows // author_rows} author: --relearn-on other-authors needs two "
                                f"or more (use --relearn-on same-authors, or a larger split)")
    if on == "same-authors" and author_rows < 2:
        raise common.UsageError("--relearn-on same-authors needs two or more rows an author (--author-rows)")


def recovery(es_after, es_unlearned, es_original):
    """(ES_V after - ES_V unlearned) / (ES_V original - ES_V unlearned): 0 where relearning gave nothing back,
    1 where it gave back what the original model had. None when the unlearned model scores as the original on V
    (nothing was unlearned there) or a value is missing."""
    if es_after is None or es_unlearned is None or es_original is None or es_original == es_unlearned:
        return None
    return (es_after - es_unlearned) / (es_original - es_unlearned)


def int_list(text: str, flag: str, allowed=None) -> list:
    """'2,5,10,20' -> [2, 5, 10, 20] ('none' -> []); raises UsageError in one line otherwise."""
    if text.strip().lower() == "none":
        return []
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = None
    if flag == "--relearn-steps":
        ok = values and all(v >= 1 for v in values) and values == sorted(set(values))
        if not ok:
            raise common.UsageError(f"--relearn-steps must be positive whole numbers in increasing order, e.g. "
                                    f"2,5,10,20 (or none), got '{text}'")
    elif not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
        raise common.UsageError(f"{flag} must be {' and/or '.join(map(str, allowed))}, comma-separated (or none), "
                                f"got '{text}'")
    return values


# ----------------------------------------------------------------------------- what is measured

def es_mean(model, tokenizer, rows, template, batch_size, question="question", where="forget"):
    return eval_tofu.mean(eval_tofu.es_exact(model, tokenizer, rows, template, batch_size, question),
                          "ES-exact" if question == "question" else "ES-perturb", where)


@torch.no_grad()
def measure_v(model, tokenizer, sets, template, batch_size=64, k=0.4) -> dict:
    """What relearning is measured by: ES-exact and ES-perturb on V, ES-exact on the held-out retain rows, and the
    Min-K%++ AUC of V (members) against the holdout rows (non-members). ES-exact and Min-K%++ of V: one pass."""
    was = model.training
    model.eval()
    _, es_v, mia_v = eval_tofu.score(model, tokenizer, common.encode_rows(tokenizer, template, sets["v"]), batch_size,
                                     mia_k=k)
    mia_h = eval_tofu.score(model, tokenizer, common.encode_rows(tokenizer, template, sets["holdout"]), batch_size,
                            mia_k=k)[2]
    out = dict(es_exact_v=eval_tofu.mean(es_v, "ES-exact", "V"),
               es_perturb_v=es_mean(model, tokenizer, sets["v"], template, batch_size, "paraphrased_question", "V"),
               es_exact_retain=es_mean(model, tokenizer, sets["retain"], template, batch_size, where="held-out retain"),
               auc_min_k_pp_v=eval_tofu.auc(mia_v["min_k_pp"], mia_h["min_k_pp"], "Min-K%++"))
    model.train(was)
    return out


def measure_forget(model, tokenizer, sets, template, batch_size=64, retain=True) -> dict:
    """ES-exact and ES-perturb on the whole forget split, and (`retain`) ES-exact on the held-out retain rows."""
    out = dict(es_exact_unlearn=es_mean(model, tokenizer, sets["forget"], template, batch_size),
               es_perturb_unlearn=es_mean(model, tokenizer, sets["forget"], template, batch_size,
                                          "paraphrased_question"))
    if retain:
        out["es_exact_retain"] = es_mean(model, tokenizer, sets["retain"], template, batch_size, where="held-out retain")
    return out


# ----------------------------------------------------------------------------- the two attacks

def relearn(model, tokenizer, train_rows, steps, lr, batch_size, seed, template, measure, name="relearn"):
    """Fine-tune `model` in place on train_rows (T) and measure it after each S of `steps` (increasing): one
    run that goes on from one S to the next, so S = 20 after S = 10 is the 20-step run. AdamW (weight decay
    0.01, common.make_optimizer) at a constant `lr`, the gradient clipped at 1, batches of `batch_size` rows
    in epochs shuffled by `seed` (common.epoch_batches); the loss is the mean NLL of the answer tokens and
    EOS, as finetune.py's. Returns [dict(steps=S, loss=the last step's loss, **measure(model))]."""
    device = next(model.parameters()).device
    model.requires_grad_(True)
    examples = common.encode_rows(tokenizer, template, train_rows)
    per_epoch = math.ceil(len(examples) / batch_size)
    optimizer = common.make_optimizer(model.parameters(), "adamw", lr)
    results, step, loss = [], 0, None
    model.train()
    for S in steps:
        while step < S:
            idx = common.epoch_batches(len(examples), batch_size, seed, step // per_epoch)[step % per_epoch]
            batch = common.collate([examples[i] for i in idx], tokenizer.pad_token_id, device)
            logp, mask = common.answer_logprobs(model, batch)
            loss = -(logp * mask).sum() / mask.sum()
            loss.backward()
            common.clip_and_step(model, optimizer, 1.0, step + 1)
            step += 1
        row = dict(steps=S, loss=loss.item(), **measure(model))
        print(f"{name} S={S} | loss {row['loss']:.4f} | " + " | ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k != "loss" and isinstance(v, float)), flush=True)
        results.append(row)
    model.requires_grad_(False).eval()
    return results


def need_bitsandbytes() -> str:
    """bitsandbytes' version; UsageError, in one line, when it is missing: only the quantization attack needs it."""
    try:
        import bitsandbytes
    except ImportError:
        raise common.UsageError("--quant-bits needs bitsandbytes: pip install bitsandbytes (or --quant-bits none)")
    return bitsandbytes.__version__


def quantize(model, bits: int, dtype=None):
    """A copy of `model` (its weights in memory) with every linear layer but the output layer quantized to
    `bits` by bitsandbytes, through transformers' BitsAndBytesConfig as Zhang et al.'s code loads a model:
    load_in_8bit (LLM.int8: int8 weights with a scale per output row, outlier inputs above 6 kept in 16 bits)
    or load_in_4bit (FP4, a scale per block of 64 weights, float32 compute), the defaults otherwise. `dtype`: of
    the layers left in floating point (default: the project's, common.device_and_dtype)."""
    from transformers import BitsAndBytesConfig
    from transformers.utils import logging
    logging.disable_progress_bar()
    config = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    device, default = common.device_and_dtype()
    q = type(model).from_pretrained(None, config=model.config, state_dict=model.state_dict(), dtype=dtype or default,
                                    quantization_config=config, device_map={"": device})
    return q.eval().requires_grad_(False)


def same_codes(q, q_original) -> float:
    """The fraction of the quantized linear weights whose stored code (int8; 4-bit, two to a byte) is the same
    in `q` as in `q_original`, each with its own scales: an unlearning update too small to move a weight to
    another level leaves its code as it was (Zhang et al.'s explanation of the failure)."""
    import bitsandbytes as bnb
    n = same = 0
    for name, m in q.named_modules():
        if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            a, b = m.weight.data, q_original.get_submodule(name).weight.data
            if isinstance(m, bnb.nn.Linear4bit):
                a, b = torch.stack([a >> 4, a & 15]), torch.stack([b >> 4, b & 15])
            n, same = n + a.numel(), same + (a == b).sum().item()
    return same / n


@contextlib.contextmanager
def quiet_int8():
    """bitsandbytes' 8-bit matmul logs at every call on a float32 model that it casts its inputs to float16
    (LLM.int8's arithmetic, said once in docs/robustness.md): its warnings are off while quantized models run."""
    import logging
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ----------------------------------------------------------------------------- the command

def fmt(v):
    return "n/a" if v is None else f"{v:.4f}"


def print_tables(before, attacks, on):
    relearnt = [a for a in attacks if a["attack"] == "relearn"]
    quantized = [a for a in attacks if a["attack"] == "quantize"]
    control = before.get("retain_only")
    if relearnt:
        print(f"\nrelearning ({on}): T relearnt, V evaluated; control: the retain-only model relearnt alike")
        print("| model | S | ES-exact V | ES-perturb V | ES-exact retain | Min-K%++ AUC V | control ES-exact V | recovery |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        keys = ("es_exact_v", "es_perturb_v", "es_exact_retain", "auc_min_k_pp_v")
        es = [before[m]["es_exact_v"] for m in ("unlearned", "original")]
        print("| original | - | " + " | ".join(fmt(before["original"][k]) for k in keys)
              + f" | | {fmt(recovery(es[1], *es))} |")
        print("| unlearned | 0 | " + " | ".join(fmt(before["unlearned"][k]) for k in keys)
              + f" | {fmt(control and control['es_exact_v'])} | {fmt(recovery(es[0], *es))} |")
        for a in relearnt:
            print(f"| relearnt | {a['steps']} | " + " | ".join(fmt(a[k]) for k in keys)
                  + f" | {fmt(a['control_es_exact_v'])} | {fmt(a['recovery'])} |")
    if quantized:
        print("\nquantization (bitsandbytes); control: the original model quantized alike")
        print("| bits | ES-exact unlearn | ES-perturb unlearn | ES-exact retain | control ES-exact unlearn | recovery | "
              "codes as the original's |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        keys = ("es_exact_unlearn", "es_perturb_unlearn", "es_exact_retain")
        es = [before[m]["es_exact_unlearn"] for m in ("unlearned", "original")]
        print("| none | " + " | ".join(fmt(before["unlearned"][k]) for k in keys)
              + f" | {fmt(es[1])} | {fmt(recovery(es[0], *es))} | |")
        for a in quantized:
            print(f"| {a['bits']} | " + " | ".join(fmt(a[k]) for k in keys)
                  + f" | {fmt(a['control_es_exact_unlearn'])} | {fmt(a['recovery'])} | {fmt(a['same_codes'])} |")


def load(path, trust_remote_code=False):
    return common.load_tokenizer(path, trust_remote_code), common.load_model(path, trust_remote_code, frozen=True)


def main(argv=None):
    parser = common.make_parser(__doc__)
    a = parser.add_argument
    a("--model", default=None, help="the unlearned model: a run folder (a LoRA run's too), another model folder or a "
                                    "hub id")
    a("--original", default=None, help="the model before unlearning (default: the run's --model in its args.json)")
    a("--retain-model", default=None, help="the retain-only model, the relearning control (default for tiny: its "
                                           "retainXX of --data; for another model none: no control)")
    a("--data", default=None, help="'builtin', a hub id such as locuslab/TOFU, or a folder of <config>.json "
                                   "files (default: the preset's, or the one the model folder was trained on)")
    a("--split", default=None, help="forget01, forget05 or forget10 (default: the forget split the model folder was "
                                    "unlearned on, from its args.json; else forget05)")
    a("--template", default=None, help="prompt template with {q} and {a} (default: the preset's, or the one the model "
                                       "folder was trained with)")
    a("--relearn-on", choices=RELEARN_ON, default="other-authors",
      help="T: half of the forget authors, V the other half (other-authors); or half of every forget author's "
           "questions, V the other half (same-authors)")
    a("--relearn-steps", default="2,5,10,20", help="relearning steps S after which to measure, increasing, "
                                                    "comma-separated; one run goes on from each to the next "
                                                    "(none: no relearning)")
    a("--relearn-lr", type=float, default=None, help="relearning learning rate, constant (default: the preset's "
                                                     "fine-tune learning rate)")
    a("--relearn-batch", type=int, default=None, help="rows of T per relearning step (default: the preset's fine-tune "
                                                      "batch, or all of T when it has fewer rows)")
    a("--author-rows", type=int, default=None, help="consecutive rows an author in the forget split (default: 10 on "
                                                    "the built-in set, 20 otherwise, as TOFU)")
    a("--quant-bits", default="8,4", help="quantize the linear layers to these bits, comma-separated, 8 and/or 4 "
                                          "(none: no quantization)")
    a("--seed", type=int, default=0, help="cuts T and V, and orders the relearning batches")
    a("--mia-k", type=float, default=0.4, help="Min-K%%++: the fraction of an answer's tokens, those of lowest score, "
                                               "that it averages (as eval_tofu.py)")
    a("--batch-size", type=int, default=64, help="rows per evaluation forward pass")
    a("--max-samples", type=int, default=None, help="only the first N held-out retain rows and holdout rows (default: "
                                                    "all; the forget rows stay whole: T and V are whole authors)")
    a("--out", default=None, help="where attack.json goes (default: MODEL_FOLDER/attack.json); the figure goes "
                                  "beside it, as attack-relearn.png")
    a("--trust-remote-code", action="store_true", help="allow a hub model's own code to run (off by default)")
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        common.single_process("attack.py")
        steps = int_list(args.relearn_steps, "--relearn-steps")
        bits = int_list(args.quant_bits, "--quant-bits", QUANT_BITS)
        if not steps and not bits:
            raise common.UsageError("--relearn-steps none and --quant-bits none leave no attack to run")
        if args.model is None:
            raise common.UsageError("--model is required: the unlearned model (a run folder, another model folder "
                                    "or a hub id)")
        if args.split is not None and args.split not in common.SPLITS:
            raise common.UsageError(f"unknown split '{args.split}' (choose from {', '.join(common.SPLITS)})")
        if args.relearn_lr is not None and not args.relearn_lr > 0:
            raise common.UsageError(f"--relearn-lr must be positive, got {args.relearn_lr}")
        for flag in ("relearn_batch", "author_rows"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise common.UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if args.batch_size < 1:
            raise common.UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.max_samples is not None and args.max_samples < 1:
            raise common.UsageError(f"--max-samples must be >= 1, got {args.max_samples}")
        if not 0 < args.mia_k <= 1:
            raise common.UsageError(f"--mia-k must be in (0, 1], got {args.mia_k}")
        library = bits and f"bitsandbytes {need_bitsandbytes()}"
        for m in (args.model, args.original, args.retain_model):  # a path that is not there, rather than a hub id
            if m and m not in common.PRESETS and common.missing_folder(m):
                raise common.UsageError(f"model folder '{m}' does not exist")
        path = common.model_path(args.model, common.data_source(args.data or "builtin")) if args.model == "tiny" \
            else common.model_path(args.model)
        out = os.path.abspath(args.out or (os.path.join(path, "attack.json") if os.path.isdir(path) else
                                           str(common.OUT / f"attack-{path.replace('/', '_')}" / "attack.json")))
        figure = os.path.splitext(out)[0] + "-relearn.png"
        if os.path.isdir(out):
            raise common.UsageError(f"--out {out} is a folder; give a file path")
        if common.inside(out, common.tiny_dir("builtin")):
            raise common.UsageError(f"{out} is among the tiny preset's models, which only finetune.py writes: give --out")
        if os.path.exists(out) and not common.own_file(out):  # a file of the user's is never replaced
            raise common.UsageError(f"{out} exists and was not written by this project: give another --out")
        if steps and os.path.exists(figure) and not (common.own_file(figure) or common.own_file(out)):
            raise common.UsageError(f"{figure} exists and was not written by this project: give another --out")
        preset, data, template = eval_tofu.model_defaults(args.model, path)
        args.data = common.data_source(args.data or data)
        notes = eval_tofu.recorded_flags("attack.py", path, args, template)  # --split, --template: args.json's
        if not 0 <= args.template.find("{q}") < args.template.find("{a}"):
            raise common.UsageError(f"--template must contain {{q}} and then {{a}}, got {args.template!r}")
        original = common.model_path(args.original, args.data) if args.original else eval_tofu.target_of(path, args.data)
        if original is None:
            raise common.UsageError(f"{path} has no args.json naming its original model: give --original")
        if common.missing_folder(original):
            raise common.UsageError(f"the original model folder '{original}' does not exist: give --original")
        # the data: the forget rows with their paraphrased questions, the held-out retain rows, the holdout rows
        split = common.split_data(args.split, args.data)
        forget = common.load_tofu(f"{args.split}_perturbed", args.data)
        if [r["question"] for r in forget] != [r["question"] for r in split["forget"]]:
            raise common.UsageError(f"the {args.split} rows and {args.split}_perturbed ask different questions")
        import fictitious
        author_rows = args.author_rows or (len(fictitious.QA) if args.data == "builtin" else 20)
        p = common.PRESETS.get(preset, common.OTHER)
        if args.data != "builtin" and "other_data" in p:
            p = {**p, **p["other_data"]}
        lr = args.relearn_lr or p["finetune_lr"]
        T, V, holdout, batch_size = [], [], None, None
        if steps:
            check_split(len(forget), author_rows, args.relearn_on, args.split)
            T, V = author_split(len(forget), author_rows, args.seed, args.relearn_on)
            if args.relearn_batch and args.relearn_batch > len(T):
                raise common.UsageError(f"--relearn-batch {args.relearn_batch} is larger than T's {len(T)} rows")
            batch_size = args.relearn_batch or min(p["finetune_batch"], len(T))
            holdout = eval_tofu.holdout_rows(args.split, args.data, args.max_samples)
        for note in notes:
            common.warn(note)
        common.warn_data(path, args.data)
        retain_path = None
        if steps:
            if args.retain_model:
                retain_path = common.model_path(args.retain_model, args.data)
            elif preset == "tiny":  # the tiny preset's retain-only model of this data (built on first use)
                retain_path = eval_tofu.tiny_retain_model(args.split, args.data)
        tokenizer, model = load(path, args.trust_remote_code)
        original_tok, original_model = load(original, args.trust_remote_code)
    except common.UsageError as e:
        common.die(str(e))
    common.set_seed(args.seed)
    sets = dict(forget=forget, retain=split["retain_eval"][:args.max_samples], v=[forget[i] for i in V], holdout=holdout)
    t_rows = [split["forget"][i] for i in T]
    print(f"attack {path} on {args.split} ({args.data}) | original {original} | "
          + (f"relearn {args.relearn_on}: T {len(T)} rows, V {len(V)} rows, S {','.join(map(str, steps))}, "
             f"lr {lr:g}, batch {batch_size} | " if steps else "")
          + (f"quantize {','.join(map(str, bits))} bits | " if bits else "")
          + f"{next(model.parameters()).device}", flush=True)

    def measure(m, tok, full=True):
        """What relearning is measured by (on V), and with `full` the whole forget split's ES too."""
        return {**(measure_v(m, tok, sets, args.template, args.batch_size, args.mia_k) if steps else {}),
                **(measure_forget(m, tok, sets, args.template, args.batch_size, retain=not steps) if full else {})}

    before = dict(unlearned=measure(model, tokenizer), original=measure(original_model, original_tok),
                  retain_only=None)
    # quantization: the unlearned model and, as its control, the original, each quantized from its weights in memory
    quantized = []
    with quiet_int8():
        for b in bits:
            q_original = quantize(original_model, b)
            control = measure_forget(q_original, original_tok, sets, args.template, args.batch_size, retain=False)
            q = quantize(model, b)
            res = measure_forget(q, tokenizer, sets, args.template, args.batch_size)
            codes = same_codes(q, q_original)
            del q, q_original
            quantized.append(dict(attack="quantize", bits=b, **res,
                                  **{f"control_{k}": v for k, v in control.items()}, same_codes=codes,
                                  recovery=recovery(res["es_exact_unlearn"], before["unlearned"]["es_exact_unlearn"],
                                                    before["original"]["es_exact_unlearn"])))
            print(f"quantize {b} bits | " + " | ".join(f"{k} {v:.4f}" for k, v in quantized[-1].items()
                                                       if isinstance(v, float)), flush=True)
    del original_model
    common.release()
    # relearning: the unlearned model (the copy in memory), then its control, the retain-only model
    relearnt, control = [], None
    if steps:
        relearnt = relearn(model, tokenizer, t_rows, steps, lr, batch_size, args.seed, args.template,
                           lambda m: measure(m, tokenizer, full=False), "relearn unlearned")
        del model
        common.release()
        if retain_path:
            try:
                retain_tok, retain_model = load(retain_path, args.trust_remote_code)
            except common.UsageError as e:
                common.die(str(e))
            before["retain_only"] = measure(retain_model, retain_tok)
            control = relearn(retain_model, retain_tok, t_rows, steps, lr, batch_size, args.seed, args.template,
                              lambda m: measure(m, retain_tok, full=False), "relearn retain-only")
    attacks = []
    for i, row in enumerate(relearnt):
        c = control[i] if control else {}
        attacks.append(dict(attack="relearn", on=args.relearn_on, steps=row["steps"],
                            **{k: row[k] for k in ("es_exact_v", "es_perturb_v", "es_exact_retain", "auc_min_k_pp_v")},
                            **{f"control_{k}": c.get(k) for k in ("es_exact_v", "es_perturb_v", "es_exact_retain",
                                                                  "auc_min_k_pp_v")},
                            recovery=recovery(row["es_exact_v"], before["unlearned"]["es_exact_v"],
                                              before["original"]["es_exact_v"]),
                            loss=row["loss"], control_loss=c.get("loss")))
    attacks += quantized
    res = dict(written_by=common.PROJECT, model=path, original=original, retain_model=retain_path,
               control=("the retain-only model " + retain_path if retain_path else
                        "none: no retain-only model (give --retain-model)") if steps else None,
               split=args.split, data=args.data, template=args.template, seed=args.seed,
               relearn=dict(on=args.relearn_on, steps=steps, lr=lr, batch_size=batch_size, author_rows=author_rows,
                            t=T, v=V) if steps else None,
               rows=dict(forget=len(forget), retain=len(sets["retain"]), holdout=len(holdout) if holdout else 0),
               quantization=dict(bits=bits, library=library) if bits else None,
               seconds=round(time.time() - t0, 1), before=before, attacks=attacks, args=vars(args))
    eval_tofu.write_json(out, res)
    print_tables(before, attacks, args.relearn_on)
    if relearnt:
        import figures  # matplotlib, only when there is a figure to draw
        common.register(figures.relearn([out], figure))
    print(f"wrote {out}" + (f" and {figure}" if relearnt else "") + f" ({res['seconds']} s)")
    return res


if __name__ == "__main__":
    common.cli(main)
