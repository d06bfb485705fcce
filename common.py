"""
Plumbing shared by every script, in this order: presets, errors and flags; data; models; batches and
masking; losses and regularizers; optimizer and schedule; several processes; LoRA; run folders. No
method logic lives here: each objective is written out in its own file (ga.py, wga.py, ...). It
imports no script of the project: a missing tiny model is built by finetune.py in its own process.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path


def cpu_info(cpuinfo="/proc/cpuinfo") -> tuple:
    """(vendor, flags) of the CPU, from /proc/cpuinfo; ("", set()) where there is none (not Linux)."""
    info = {}
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info.get("vendor_id", ""), set(info.get("flags", "").split())


def reproducible_cpu(cpuinfo="/proc/cpuinfo") -> dict:
    """The CPU arithmetic that gives the same bytes on every x86-64 CPU with AVX2 and FMA, whatever its
    newer instructions (AVX-512) and the number of threads: torch's AVX2 kernels and MKL's AVX2 code path
    in its strict mode (docs/reproducibility.md; MKL promises it on Intel CPUs). {} elsewhere."""
    return dict(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2,STRICT") if {"avx2", "fma"} <= cpu_info(cpuinfo)[1] else {}


# Set before torch computes anything (both are read on first use), over any value the environment had: the
# same arithmetic on every such CPU is what makes a build's bytes and a run's numbers reproduce.
os.environ.update(reproducible_cpu())

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Weights such as p^alpha of forgotten tokens underflow into denormal floats, which the CPU
# handles many times slower in every matmul of the backward pass: flush them to zero.
torch.set_flush_denormal(True)

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"  # runs and the cached tiny model (git-ignored)


# ----------------------------------------------------------------------------- presets, errors and flags

# Model presets. `path` is what gets loaded; `base` is what finetune.py starts from.
# lr/epochs are the unlearning defaults (the paper's Section 5 for phi-1.5 and Llama-2-7B);
# finetune_* are finetune.py's (TOFU's for the hub models; the tiny model starts from scratch).
# lora_lr: the default with --lora-r (tiny: measured, docs/lora.md; the hub presets: TOFU's LoRA configs' 1e-4).
QA_TEMPLATE = "Question: {q}\nAnswer: {a}"
PRESETS = {
    "tiny": dict(path=str(OUT / "tiny" / "full"), base=None, template=QA_TEMPLATE, data="builtin",
                 lr=1e-3, epochs=5, finetune_lr=3e-3, finetune_epochs=30, finetune_batch=32, uwc_tol=0.10,
                 rmu_layer=3, rmu_c=4.0, lora_lr=3e-3, finetune_lora_lr=3e-3,
                 # its fine-tune on any other data source, sized for the real TOFU (docs/real_tofu.md)
                 other_data=dict(finetune_lr=3e-3, finetune_epochs=20, finetune_batch=32)),
    "phi-1.5": dict(path="locuslab/tofu_ft_phi-1.5", base="microsoft/phi-1_5", template=QA_TEMPLATE,
                    data="locuslab/TOFU", lr=2e-5, epochs=5, finetune_lr=2e-5, finetune_epochs=5,
                    finetune_batch=16, uwc_tol=0.10, rmu_layer=9, rmu_c=4.0, lora_lr=1e-4, finetune_lora_lr=1e-4),
    "llama2-7b": dict(path="locuslab/tofu_ft_llama2-7b", base="NousResearch/Llama-2-7b-chat-hf",
                      template="[INST] {q} [/INST]{a}", data="locuslab/TOFU", lr=1e-5, epochs=5,
                      finetune_lr=1e-5, finetune_epochs=5, finetune_batch=16, uwc_tol=0.05, rmu_layer=21, rmu_c=2.0,
                      lora_lr=1e-4, finetune_lora_lr=1e-4),
}

# a hub id or a local folder: these, unless the flags say otherwise
OTHER = dict(template=QA_TEMPLATE, data="locuslab/TOFU", lr=1e-5, epochs=5, finetune_lr=1e-5,
             finetune_epochs=5, finetune_batch=16, uwc_tol=0.10, rmu_layer=None, rmu_c=4.0, lora_lr=1e-4,
             finetune_lora_lr=1e-4)
SPLITS = ("forget01", "forget05", "forget10")
N_EVAL = 400  # the first rows of every retain split are for evaluation only (paper, Appendix B.1)

# --min-forget-es: a model before unlearning with a forget ES-exact below this hardly knows the forget set
# (eval_tofu.check_forget_es). Not 0.5: the paper's phi-1.5 target model has 0.5969 / 0.5619 / 0.4799 on
# forget01/05/10 (Table 1; Llama-2-7B 0.77-0.83). The tiny target model has 1.0, a 2-step fine-tune 0.0.
MIN_FORGET_ES = 0.3


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with exit status 2."""


def say_error(msg: str, every_rank: bool = False):
    """The one line `script.py: error: msg` on stderr. Under torchrun rank 0 says it (every process
    meets the same bad input), or with `every_rank` each process, marked with its rank."""
    rank = world()[0]
    if rank == 0 or every_rank:
        print(f"{f'[rank {rank}] ' if rank else ''}{Path(sys.argv[0]).name}: error: {msg}", file=sys.stderr)


def warn(msg: str):
    """The one line `script.py: warning: msg` on stderr (under torchrun, from rank 0)."""
    if is_main():
        print(f"{Path(sys.argv[0]).name}: warning: {msg}", file=sys.stderr, flush=True)


def die(msg: str, every_rank: bool = False):
    """Say the error in one line (see say_error) and exit with status 2."""
    say_error(msg, every_rank)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line on stderr (and exit status 2), not the usage block."""

    def error(self, message):
        die(message)


def make_parser(doc: str) -> Parser:
    return Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_shared_flags(parser, split="forget05"):
    """The flags every training script carries, in one order with one help text."""
    a = parser.add_argument
    a("--model", default="tiny", help=f"preset ({', '.join(PRESETS)}), hub id or local model folder")
    a("--data", default=None, help="'builtin', a hub id such as locuslab/TOFU, or a folder of <config>.json "
                                   "files (default: the preset's)")
    a("--split", default=split, help="TOFU config; forget01/05/10 unlearn the last 1/5/10%% of the authors")
    a("--template", default=None, help="prompt template with {q} and {a} (default: the preset's)")
    a("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    a("--epochs", type=float, default=None, help="passes over the forget rows (default: the preset's, 5 in the paper)")
    a("--batch-size", type=int, default=None, help="effective batch, rows per optimizer step (default: 16, or "
                                                   "all rows of a smaller forget set)")
    a("--grad-accum", type=int, default=1, help="micro-batches per step (must divide --batch-size)")
    a("--warmup-epochs", type=float, default=1, help="linear warm-up length in epochs, then linear decay to 0")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    a("--optim", choices=("adamw", "sgd"), default="adamw", help="optimizer")
    a("--max-steps", type=int, default=0, help="stop after this many steps (0 = no cap), for smoke tests")
    a("--seed", type=int, default=0, help="random seed")
    a("--out", default=None, help="run folder: new, empty, or a run of this project's (default: "
                                  "out/<script>-<model>-<split>)")
    a("--log-every", type=int, default=1, help="print and log every N steps")
    a("--overwrite", action="store_true", help="replace the run already in --out (refused otherwise; a folder "
                                                 "this project did not write is never touched)")
    a("--trust-remote-code", action="store_true", help="allow a hub model's own code to run (off by default)")
    a("--lora-r", type=int, default=0, help="LoRA rank: train peft adapters only, merged into the saved model "
                                            "(0 = off: every weight trains)")
    a("--lora-alpha", type=float, default=32, help="LoRA scale: the update is alpha/r x BA (TOFU's 32)")
    a("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (0: a deterministic G-effect)")
    a("--lora-targets", default="all-linear", help="comma-separated module names to adapt (default: every linear "
                                                   "layer but the output layer, i.e. the attention and MLP projections)")


def add_unlearn_flags(parser):
    """The flags every unlearning script adds after the shared ones."""
    a = parser.add_argument
    a("--reg", choices=("none", "gd", "kl", "rr"), default="kl",
      help="regularizer on retain rows: none, gd (NLL), kl (KL to the original), rr (representations)")
    a("--reg-weight", type=float, default=1.0, help="weight of the regularizer")
    a("--rr-layer", type=int, default=None, help="hidden state for --reg rr (default: the preset's RMU layer)")
    a("--no-eval", action="store_true", help="skip the ES-exact before and after unlearning")
    a("--max-samples", type=int, default=None, help="the ES-exact before and after on the first N forget and "
                                                     "held-out retain rows only, for a quick check (default: all)")
    a("--no-save", action="store_true", help="write the run folder's logs but not the model's weights")
    add_min_forget_es(parser)


def add_min_forget_es(parser):
    """--min-forget-es: the method scripts, sweep.py, uwc.py and eval_tofu.py carry it alike."""
    parser.add_argument("--min-forget-es", type=fraction, default=MIN_FORGET_ES,
                        help=f"warn when the model before unlearning has a forget ES-exact below this: it hardly "
                             f"knows the forget set (0 = no check; default {MIN_FORGET_ES:g}, below the paper's "
                             f"target models)")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got '{text}'")
    return v


def check_batch(args, what=None):
    if args.batch_size < 1 or args.grad_accum < 1:
        raise UsageError(f"--batch-size and --grad-accum must be >= 1, got {args.batch_size} and {args.grad_accum}")
    if args.batch_size % args.grad_accum:
        raise UsageError(f"--grad-accum ({args.grad_accum}) must divide {what or f'--batch-size ({args.batch_size})'}")


def fit_batch(args, n_rows: int):
    """A method's batch: the paper's 16 rows by default, or all of a smaller forget set (the built-in
    forget01 has 10 rows); an explicit --batch-size larger than the forget set is an error."""
    what = None
    if args.batch_size is None:
        args.batch_size = min(16, n_rows)
        what = f"the default batch of {args.batch_size} rows" + (" (the whole forget set)" if n_rows < 16 else "")
    elif args.batch_size > n_rows:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {n_rows} forget rows")
    check_batch(args, what)


def resolve_flags(args, finetune=False):
    """Fill the flags left unset from the preset and check them all; raise UsageError."""
    args.model = os.path.expanduser(args.model)
    args.data = args.data and os.path.expanduser(args.data)
    if args.model not in PRESETS and missing_folder(args.model):
        if args.model.startswith((".", "/", "~")) or "/" in args.model:
            raise UsageError(f"model folder '{args.model}' does not exist")
        raise UsageError(f"unknown model '{args.model}': not a preset ({', '.join(PRESETS)}), a local folder "
                         f"or a hub id owner/name (such as openai-community/gpt2)")
    p = PRESETS.get(args.model, OTHER)
    args.data = data_source(args.data or p["data"])  # a folder by its absolute path: args.json says which
    if finetune and args.data != "builtin" and "other_data" in p:
        p = {**p, **p["other_data"]}
    pre = "finetune_" if finetune else ""
    args.lr = p[pre + ("lora_lr" if args.lora_r else "lr")] if args.lr is None else args.lr
    args.epochs = p[pre + "epochs"] if args.epochs is None else args.epochs
    if finetune and args.batch_size is None:
        args.batch_size = p["finetune_batch"]  # a method's default depends on the forget set: see fit_batch
    args.template = args.template or p["template"]
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if not args.epochs > 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    if args.batch_size is not None:
        check_batch(args)
    if args.warmup_epochs < 0 or args.max_grad_norm < 0 or args.max_steps < 0 or args.log_every < 1:
        raise UsageError("--warmup-epochs, --max-grad-norm and --max-steps must be >= 0, --log-every >= 1")
    if getattr(args, "max_samples", None) is not None and args.max_samples < 1:
        raise UsageError(f"--max-samples must be >= 1, got {args.max_samples}")
    if getattr(args, "reg_weight", 0) < 0:
        raise UsageError(f"--reg-weight must be >= 0, got {args.reg_weight}")
    if getattr(args, "rr_layer", 0) is None:
        args.rr_layer = p["rmu_layer"]
    check_lora(args)
    q, a = args.template.find("{q}"), args.template.find("{a}")
    if q < 0 or a < q:
        raise UsageError(f"--template must contain {{q}} and then {{a}}, got {args.template!r}")
    return args


# ----------------------------------------------------- data: TOFU's configs, from the built-in set, a folder or the hub

# Fields every row of a config must have (the hub's schema).
QA_FIELDS = ("question", "answer")
PERTURBED_FIELDS = QA_FIELDS + ("paraphrased_answer", "perturbed_answer", "paraphrased_question")
CONFIG_FIELDS = {
    **{c: QA_FIELDS for c in ("full", "forget01", "forget05", "forget10", "retain99", "retain95", "retain90",
                              "holdout01", "holdout05", "holdout10")},
    **{c: PERTURBED_FIELDS for c in ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed",
                                     "retain_perturbed")},
    **{c: QA_FIELDS + ("option1", "option2", "option3", "option4") for c in ("real_authors", "world_facts")},
    **{c: QA_FIELDS + ("perturbed_answer",) for c in ("real_authors_perturbed", "world_facts_perturbed")},
}
_BUILTIN = None


def load_tofu(config: str, data: str = "builtin") -> list:
    """Rows (dicts with the hub's fields) of one TOFU config from `data`: 'builtin', a local
    folder of <config>.json / .jsonl files (JSON Lines or one JSON list), or a hub id."""
    global _BUILTIN
    if config not in CONFIG_FIELDS:
        raise UsageError(f"unknown TOFU config '{config}' (known: {', '.join(CONFIG_FIELDS)})")
    if data == "builtin":
        if _BUILTIN is None:
            import fictitious
            _BUILTIN = fictitious.generate()
        rows = [dict(r) for r in _BUILTIN[config]]
        where = "the built-in set"
    elif os.path.isdir(data):
        rows, where = _read_folder(data, config)
    elif missing_folder(data):
        raise UsageError(f"data folder '{data}' does not exist")
    else:
        rows, where = rank0_first(lambda: _read_hub(data, config))  # under torchrun the others then read the cache
    if not rows:
        raise UsageError(f"config '{config}' in {where} has no rows")
    for i, r in enumerate(rows):
        missing = [f for f in CONFIG_FIELDS[config] if f not in r]
        if missing:
            raise UsageError(f"row {i} of config '{config}' in {where} lacks field(s) {', '.join(missing)}")
    return rows


def _read_folder(folder, config):
    tried = [os.path.join(folder, config + ext) for ext in (".json", ".jsonl")]
    path = next((p for p in tried if os.path.isfile(p)), None)
    if path is None:
        raise UsageError(f"config '{config}' not found: tried {' and '.join(tried)}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text), path
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append(json.loads(line))
                if not isinstance(rows[-1], dict):
                    raise ValueError(f"line {n} is not a JSON object")
        return rows, path
    except (json.JSONDecodeError, ValueError) as e:
        raise UsageError(f"{path} is not valid JSON / JSON Lines: {e}")


def _read_hub(hub_id, config):
    try:
        import datasets
        datasets.logging.set_verbosity_error()
        _quiet_hub()
        hub_check(hub_id, "dataset")
        return [dict(r) for r in datasets.load_dataset(hub_id, config, split="train")], f"hub dataset {hub_id}"
    except UsageError:
        raise
    except Exception as e:  # no network, unknown id or config: say what was tried and what works offline
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UsageError(f"cannot load config '{config}' of hub dataset '{hub_id}' ({msg}); "
                         f"offline, use --data builtin or a local folder of <config>.json files")


def split_data(split: str, data: str = "builtin") -> dict:
    """forget rows, retain rows for training and the held-out retain rows for evaluation.
    `forgetXX` pairs with `retain(100-XX)`; its first 400 rows are evaluation-only."""
    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    forget = load_tofu(split, data)
    retain = load_tofu(f"retain{100 - int(split[-2:])}", data)
    if len(retain) <= N_EVAL:
        raise UsageError(f"retain{100 - int(split[-2:])} has {len(retain)} rows; more than {N_EVAL} are "
                         f"needed (the first {N_EVAL} are evaluation-only)")
    return dict(forget=forget, retain_train=retain[N_EVAL:], retain_eval=retain[:N_EVAL])


def data_source(data: str) -> str:
    """One name per data source: 'builtin', a hub id, or a folder's absolute real path."""
    return os.path.realpath(os.path.expanduser(data)) if os.path.isdir(os.path.expanduser(data)) else data


def source_slug(data: str) -> str:
    """A folder name for a data source: a folder's name and a hash of its real path (two folders
    named alike stay apart), a hub id as owner--name. Never a config name."""
    src = data_source(data)
    if os.path.isdir(src):
        import hashlib
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(src).name) or "data"
        return f"{name}-{hashlib.sha1(src.encode()).hexdigest()[:8]}"
    return src.replace("/", "--")


def missing_folder(name: str) -> bool:
    """True for a name that can only be a local folder (a path, not a hub id owner/name) and is not there."""
    return not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") != 1)


def hub_check(name: str, kind: str = "model"):
    """Fail fast, in one line, when `name` is neither cached nor reachable on the hub: offline, the
    hub client would otherwise retry for most of a minute before saying so. A cached copy (or
    HF_HUB_OFFLINE=1) skips the check, so that it still loads offline."""
    from huggingface_hub import constants, dataset_info, model_info
    from huggingface_hub.errors import RepositoryNotFoundError
    cached = os.path.isdir(os.path.join(constants.HF_HUB_CACHE, f"{kind}s--{name.replace('/', '--')}"))
    if cached or constants.HF_HUB_OFFLINE:
        return
    fix = "--model tiny or a local model folder" if kind == "model" else \
        "--data builtin or a local folder of <config>.json files"
    try:
        (model_info if kind == "model" else dataset_info)(name, timeout=10)
    except RepositoryNotFoundError:
        raise UsageError(f"'{name}' is not a {kind} on the Hugging Face hub (or not one this login can see); "
                         f"use {fix}")
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UsageError(f"cannot reach the Hugging Face hub for {kind} '{name}' ({first}) and it is not in the "
                         f"local cache; use {fix}")


def _quiet_hub():
    """The hub client's own warnings (e.g. each failed request offline) stay off stderr: a
    failure is reported once, in our one line."""
    from huggingface_hub.utils import logging as hub_logging
    hub_logging.set_verbosity_error()


# -------------------------------------------- models: where they come from (the tiny preset's builds), loading, devices

def device_and_dtype():
    """CUDA with bf16 when there is a GPU, else CPU with fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    return torch.device("cpu"), torch.float32


def model_path(model: str, data: str = "builtin") -> str:
    """Where a preset, hub id or folder is loaded from; for the tiny preset, its model of `data`,
    built when it is missing (tiny_path)."""
    if model == "tiny":
        return tiny_path("full", data)
    return PRESETS[model]["path"] if model in PRESETS else model


def tiny_dir(data: str = "builtin") -> Path:
    """The tiny preset's models of one data source: out/tiny for the built-in set, out/tiny/<slug>
    (source_slug) for a folder or hub id, so the sources never share a model."""
    root = Path(PRESETS["tiny"]["path"]).parent
    return root if data_source(data) == "builtin" else root / source_slug(data)


# The tiny preset's own builds: finetune.py makes them, common.py checks them on every load and, for one
# that is missing, runs finetune.py in a process of its own (common.py imports no script).
# The tiny model's size per data source: the built-in set (1090 short rows), and any other source,
# sized for the real TOFU (4217 rows, answers 3x as long; measured in docs/real_tofu.md).
# The epochs and learning rate go with it: PRESETS["tiny"] (finetune_*, other_data).
TINY_SIZES = dict(
    builtin=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256, vocab=2048),  # ~1.8M parameters
    other=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=512, vocab=4096),
)

# What makes a tiny build, beside its sizes: a folder of the tiny preset (tiny_dir) holds the build whose
# recipe is the preset's, recorded in its mark (MARKER) and compared on every load.
RECIPE_FLAGS = ("data", "split", "template", "lr", "epochs", "batch_size", "grad_accum", "warmup_epochs",
                "max_grad_norm", "optim", "max_steps", "seed")
RECIPE_VERSION = 2  # raise it when the build's code changes what a recipe makes (2: reproducible_cpu)


def tiny_size(data: str) -> dict:
    """The tiny model's architecture and vocabulary size for a data source (TINY_SIZES)."""
    return TINY_SIZES["builtin" if data == "builtin" else "other"]


def tiny_recipe(args) -> dict:
    """A tiny build's recipe: the flags that shape the model, its sizes, and RECIPE_VERSION."""
    return dict({k: getattr(args, k) for k in RECIPE_FLAGS}, size=tiny_size(args.data), version=RECIPE_VERSION)


def preset_recipe(data: str, split: str) -> dict:
    """The recipe of the tiny preset's own build of `split` of `data`: finetune.py's defaults (its flags
    are the shared ones, resolved for a fine-tune)."""
    parser = make_parser(None)
    add_shared_flags(parser, split="full")
    return tiny_recipe(resolve_flags(parser.parse_args(["--data", data, "--split", split]), finetune=True))


def recipe_differs(built: dict, want: dict) -> str:
    """What sets a recorded recipe apart from the preset's, as flags (or 'an older recipe'); '' if nothing."""
    if built.get("version") != want["version"] or set(built) != set(want):
        return "an older recipe"
    diff = [k for k in want if built[k] != want[k]]
    return ", ".join(f"--{k.replace('_', '-')} {built[k]}" if k in RECIPE_FLAGS else f"{k} {built[k]}" for k in diff)


def check_preset_model(path, data: str, config: str):
    """Raise UsageError unless `path` holds the tiny preset's own, finished build of `config` of `data`:
    a shortened build (--max-steps), one made with other flags or by an older recipe, or a folder this
    project did not write is never taken as the model before unlearning."""
    mark = read_marker(path)
    built = (mark or {}).get("recipe")
    why = ("it carries no mark of this project's" if mark is None else
           "its build did not finish" if not mark.get("complete") else
           "it has no recorded recipe" if not isinstance(built, dict) else "")
    if not why:
        diff = recipe_differs(built, preset_recipe(data, config))
        why = diff and f"it was built with {diff}"
    if why:
        cmd = "python finetune.py --split " + config + ("" if data == "builtin" else f" --data {data}")
        fix = f"move it away, then rebuild it: {cmd}" if mark is None else f"rebuild it: {cmd} --overwrite"
        raise UsageError(f"{path} is not the tiny preset's model of {config} ({why}); {fix}")


def tiny_path(config: str, data: str = "builtin") -> str:
    """tiny_dir(data)/<config>: the tiny model fine-tuned on `config` of `data` (full: the target
    model; retainXX: the retain-only model of Forget Quality), built by finetune.py on first use, then
    cached. The build says what it makes, why and about how long, then shows a progress bar. Under
    torchrun rank 0 builds it while the others wait; another process that needs it meanwhile waits too."""
    path = str(tiny_dir(data) / config)

    built = lambda: os.path.isdir(path) and bool(os.listdir(path))  # a build moves into place whole (Run)

    def find_or_build():
        if built():  # the preset's own build, or one line that says how to rebuild it
            return check_preset_model(path, data, config)
        load_tofu(config, data)  # bad data fails here, in one line, before anything is written or announced
        from filelock import FileLock  # (the hub client's own dependency) two first uses at once: one build
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path + ".lock"):  # only where a build may start: a cached model is read without it
            if built():  # built by another process while this one waited
                return check_preset_model(path, data, config)
            build()

    def build():
        t0 = time.time()
        what = ("the tiny target model (the model before unlearning that --model tiny loads)" if config == "full" else
                f"the tiny retain-only model of {config} (Forget Quality compares against it; "
                f"eval_tofu.py --no-fq skips it)")
        print(f"[tiny] no model at {path}: building {what}, from scratch on {config} of "
              f"{'the built-in set' if data == 'builtin' else data}; it is cached for later runs", flush=True)
        run_finetune(["--model", "tiny", "--data", data, "--split", config, "--out", path, "--log-every", "100"])
        print(f"[tiny] built {path} in {time.time() - t0:.0f} s", flush=True)
    rank0_first(find_or_build)
    return path


def run_finetune(argv: list):
    """`python finetune.py argv` in a process of its own, always one process (torchrun's variables are
    left out of its environment); its output is passed on as it comes, to this process's stdout and
    stderr. A failure raises UsageError with finetune.py's own error line."""
    import codecs
    import subprocess
    import threading
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("TORCHELASTIC_")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    error = []

    def relay(pipe, dst):
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        for chunk in iter(lambda: os.read(pipe.fileno(), 1 << 16), b""):
            text = decode(chunk)
            if text.startswith("finetune.py: error: "):  # said once, by the caller's UsageError
                error.append(text.strip().removeprefix("finetune.py: error: "))
                continue
            dst.write(text)
            dst.flush()
    pairs = ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))
    threads = [threading.Thread(target=relay, args=pair) for pair in pairs]
    try:
        for t in threads:
            t.start()
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted here: the build stops too, and leaves no model (Run)
            proc.terminate()
            proc.wait()
        for t in threads:
            t.join()
    if code:
        raise UsageError(f"finetune.py {' '.join(map(str, argv))} failed: "
                         f"{error[0] if error else f'exit status {code}, its output above says why'}")


def run_args(path: str) -> dict:
    """The args.json beside a model (the flags of the script that made it), or {} where there is none
    (a hub id, a folder of one's own). Raises UsageError, naming the file, when it cannot be read, is
    not valid JSON or is not a JSON object, or records model, data, template or split as a non-string:
    a broken one would otherwise drop the defaults and warnings that depend on it without a word."""
    f = os.path.join(path, "args.json")
    if not os.path.isfile(f):
        return {}
    try:
        with open(f, encoding="utf-8") as fh:
            a = json.load(fh)
    except OSError as e:
        raise UsageError(f"cannot read {f}: {e.strerror}")
    except ValueError as e:
        raise UsageError(f"{f} is not valid JSON: {e}")
    if not isinstance(a, dict):
        raise UsageError(f"{f} is not a JSON object (it should hold the flags of the run that made the model)")
    bad = [k for k in ("model", "data", "template", "split") if a.get(k) is not None and not isinstance(a[k], str)]
    if bad:
        raise UsageError(f"{f}: '{bad[0]}' is not a string but {a[bad[0]]!r}")
    return a


def warn_data(path: str, data: str):
    """One warning line on stderr when the model folder's args.json records other training data than
    `data`: its numbers on `data` would measure a model that never saw it. A broken args.json: UsageError."""
    trained = run_args(path).get("data")
    if trained and data_source(trained) != data_source(data):
        warn(f"{path} was trained on data {trained}, not on {data}: its numbers on {data} measure a model that "
             f"never learnt that data")


def load_tokenizer(path: str, trust_remote_code=False):
    from transformers import AutoTokenizer
    _quiet_hub()

    def read():
        if not os.path.isdir(path):
            hub_check(path)
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise UsageError(_load_error("tokenizer", path, e))
    tok = rank0_first(read)  # under torchrun the others then read the cache
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked by the attention mask and labels, never by id
    return tok


def load_model(path: str, trust_remote_code=False, frozen=False, lora=None):
    """A causal LM from a folder or hub id, as safetensors only: bf16 on CUDA, fp32 on CPU.
    `frozen=True` gives the reference model: eval mode, no gradients. Under torchrun only rank 0
    reads the weights; the others build an empty skeleton, and `place` shards the model and
    broadcasts rank 0's weights into the shards (host memory for one copy, not one per process)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()  # keeps stderr for what matters
    dtype = device_and_dtype()[1]

    def read():
        try:
            if is_main():
                return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                            trust_remote_code=trust_remote_code)
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise UsageError(_load_error("model", path, e))
    model = rank0_first(read)
    if frozen:
        model.eval().requires_grad_(False)
    if getattr(lora, "lora_r", 0):
        model = add_lora(model, lora)
    return place(model)


def _load_error(what, path, e):
    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
    if os.path.isdir(path):
        return f"cannot load the {what} from folder '{path}': {first}"
    return (f"cannot load the {what} '{path}' (not a local folder; the hub may be out of reach: {first}); "
            f"use --model tiny or a local model folder")


def place(model):
    """Put `model` on this process's device: whole in a plain run, sharded with FSDP2 under torchrun."""
    return shard_model(model) if world()[1] > 1 else model.to(device_and_dtype()[0])


def load_for_unlearning(args, reference: bool, loaded: tuple = None):
    """The data split, tokenizer, model to unlearn and (if `reference`) the frozen original model;
    raises UsageError. A layer flag is checked against the model's depth here, and with
    --geffect-every that the decoder layers can be found (decoder_layers). Under torchrun this
    starts the process group and the models come back sharded (FSDP2). With --lora-r the model is
    wrapped in adapters and the reference is the same model with them off (AdaptersOff). `loaded`: the
    same four already in memory (sweep.py runs many configurations in one process): checked, not reloaded."""
    init_distributed()
    lora_r = getattr(args, "lora_r", 0)
    if loaded is not None:
        data, tokenizer, model, ref_model = loaded
    else:
        data = split_data(args.split, args.data)
    fit_batch(args, len(data["forget"]))
    check_micro_batches(len(data["forget"]), args)
    if loaded is None:
        path = model_path(args.model, args.data)
        warn_data(path, args.data)
        tokenizer = load_tokenizer(path, args.trust_remote_code)
        model = load_model(path, args.trust_remote_code, lora=args)
        if lora_r:
            n_train, n_all = (sum(p.numel() for p in model.parameters() if p.requires_grad or not only)
                              for only in (True, False))
            print(f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} on {args.lora_targets}: "
                  f"{n_train / 1e6:.3f}M of {n_all / 1e6:.2f}M parameters train")
    elif lora_r and not is_lora(model):
        raise UsageError("--lora-r with models passed in memory needs the model in its adapters (sweep.py --lora-r)")
    if getattr(args, "geffect_every", 0):
        decoder_layers(model)  # the G-effect's groups need them (under torchrun, shard_model already did)
    if loaded is None:  # with LoRA, the reference is the same base weights with the adapters off
        ref_model = None if not reference else AdaptersOff(model) if lora_r else \
            load_model(path, args.trust_remote_code, frozen=True)
    elif reference and ref_model is None:
        raise UsageError("this method needs the original model as a reference, and none was passed")
    n_layers = model.config.num_hidden_layers
    for flag in ("rr_layer", "layer"):
        v = getattr(args, flag, None)
        if v is not None and not 0 <= v <= n_layers:
            raise UsageError(f"--{flag.replace('_', '-')} {v} is out of range: the model has hidden states "
                             f"0..{n_layers} (0 = embeddings)")
    if args.reg == "rr" and args.rr_layer is None:
        raise UsageError("--reg rr needs --rr-layer for a model that is not a preset")
    return data, tokenizer, model, ref_model


# ----------------------------------------------- batches and masking: encoding, padding, answer-token log-probabilities

def encode(tokenizer, template: str, question: str, answer: str) -> dict:
    """Token ids of template(question, answer) + EOS, labels -100 on the prompt, and the
    prompt ids for generation. The prompt's trailing spaces go with the answer (BPE joins a
    space to the next word); the answer starts where the whole text's tokens stop agreeing
    with the prompt's, which is checked rather than assumed."""
    head = template.split("{a}")[0].replace("{q}", question)
    prompt = head.rstrip(" ")
    full = prompt + head[len(prompt):] + answer + template.split("{a}")[1].replace("{q}", question)
    p_ids = tokenizer(prompt).input_ids
    ids = tokenizer(full).input_ids
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]  # EOS is labelled: the model learns where the answer stops
    n = 0
    while n < min(len(p_ids), len(ids) - 1) and p_ids[n] == ids[n]:
        n += 1
    return dict(input_ids=ids, labels=[-100] * n + ids[n:], prompt_ids=p_ids)


def encode_rows(tokenizer, template, rows, question="question", answer="answer") -> list:
    """`encode` every row, reading the question and answer from the named fields."""
    return [encode(tokenizer, template, r[question], r[answer]) for r in rows]


def collate(examples: list, pad_id: int, device="cpu") -> dict:
    """Right-pad a list of encoded examples to the longest one (dynamic padding)."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attn[i, :n] = 1
    batch = dict(input_ids=ids.to(device), labels=labels.to(device), attention_mask=attn.to(device))
    if "alt" in examples[0]:  # another answer to the same question (PO's refusals), batched alongside
        batch["alt"] = collate([e["alt"] for e in examples], pad_id, device)
    if "ref_logp" in examples[0]:  # the original model's answer-token log-probs, aligned with `mask`
        ref = torch.zeros((len(examples), T - 1), dtype=torch.float32)
        for i, e in enumerate(examples):
            pos = [t - 1 for t, y in enumerate(e["labels"]) if y != -100]
            ref[i, pos] = torch.tensor(e["ref_logp"])
        batch["ref_logp"] = ref.to(device)
    return batch


def n_answer(examples) -> int:
    """Answer tokens (labels other than -100) of encoded examples."""
    return sum(sum(y != -100 for y in e["labels"]) for e in examples)


def token_logprobs(logits, labels):
    """Per-token log p(answer token | prefix), shape B x (T-1), and the answer mask.
    logits: B x T x V; labels: B x T with -100 off the answer. Position t predicts token t+1."""
    targets = labels[:, 1:]
    mask = targets != -100
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax in fp32 at least; fp64 stays fp64 (gradient tests)
    logp = -F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return logp, mask


def answer_logprobs(model, batch):
    """Forward `batch` through `model`: (logp B x (T-1), mask B x (T-1)) of the answer tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_logprobs(logits, batch["labels"])


def epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int) -> list:
    """Row indices of one epoch, shuffled with (seed, epoch), cut into batches (last may be short)."""
    order = list(range(n_rows))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]


def chunks(rows: list, parts: int) -> list:
    """`rows` cut into `parts` contiguous chunks whose sizes differ by at most one (larger first)."""
    q, r = divmod(len(rows), parts)
    cuts = [k * q + min(k, r) for k in range(parts + 1)]
    return [rows[cuts[k]:cuts[k + 1]] for k in range(parts)]


def unlearn_batches(forget: list, retain: list, args, total: int, pad_id: int, device):
    """Yield, for each of `total` optimizer steps, the micro-batches [(forget_batch, retain_batch), ...]
    and the step's normalizers n = {forget_tok, forget_rows, retain_tok}. An epoch is one pass over
    the forget rows; retain rows are drawn in their own shuffled passes, --batch-size per step. Both
    sides of a step are cut into the same number of micro-batches, --grad-accum or fewer when an
    epoch's short last batch has fewer forget rows, so every retain row of the step is used and
    any --grad-accum gives the step of --grad-accum 1. Under torchrun each process gets its share
    of every micro-batch's rows; n counts the whole step. A forget micro-batch also carries its
    step (0-based), epoch (1-based), whether it is the step's last, and `rows`: its rows' indices in `forget`."""
    per_epoch = math.ceil(len(forget) / args.batch_size)
    retain_order = [i for e in range(math.ceil(total * args.batch_size / len(retain)) + 1)
                    for i in epoch_batches(len(retain), len(retain), args.seed + 1, e)[0]]
    for step in range(total):
        f_idx = epoch_batches(len(forget), args.batch_size, args.seed, step // per_epoch)[step % per_epoch]
        r_idx = retain_order[step * args.batch_size:(step + 1) * args.batch_size]
        f_ex, r_ex = [forget[i] for i in f_idx], [retain[i] for i in r_idx]
        n = dict(forget_tok=n_answer(f_ex), forget_rows=len(f_ex), retain_tok=n_answer(r_ex))
        if "alt" in f_ex[0]:
            n["alt_tok"] = n_answer([e["alt"] for e in f_ex])
        parts = min(args.grad_accum, len(f_ex))
        batches = [(collate(shard(f), pad_id, device), collate(shard(r), pad_id, device))
                   for f, r in zip(chunks(f_ex, parts), chunks(r_ex, parts))]
        rows = [shard(i) for i in chunks(f_idx, parts)]  # each forget row's index in the split, as batched
        for k, (forget_batch, _) in enumerate(batches):  # where each micro-batch stands (G-effect, token weights)
            forget_batch.update(step=step, last=k + 1 == len(batches), n_tok=n["forget_tok"],
                                epoch=step // per_epoch + 1, rows=rows[k])
        # the step's own retain rows, for a G-effect whose D_r is the step's retain batch (--geffect-dr step)
        batches[-1][0].update(step_retain=[r for _, r in batches], retain_tok=n["retain_tok"])
        yield batches, n


@torch.no_grad()
def add_reference_logprobs(ref_model, examples: list, pad_id: int, device, batch_size: int = 32):
    """Store the original model's answer-token log-probs in each example (`ref_logp`), once,
    before the loop: the reference model is frozen, so they never change."""
    for k in range(0, len(examples), batch_size):
        chunk = examples[k:k + batch_size]
        logp, mask = answer_logprobs(ref_model, collate(chunk, pad_id, device))
        for e, lp, m in zip(chunk, logp, mask):
            e["ref_logp"] = lp[m].tolist()


# --------------------------------------------------------- losses and regularizers: the retain side every method shares

@torch.no_grad()
def nll(model, batch: dict, n_tok: int) -> float:
    """Summed answer-token NLL of `batch` divided by `n_tok`, without gradient (for the logs)."""
    logp, mask = answer_logprobs(model, batch)
    return -(logp * mask).sum().item() / n_tok


def regularizer(reg: str, model, ref_model, batch: dict, n_tok: int, layer: int = None, measure: bool = False):
    """The retain-side term on a retain batch, normalised by `n_tok`, the answer tokens of the
    whole step's retain batch (micro-batch shares add up to the step's mean). Returns
    (loss, retain NLL share); with reg 'none' the NLL is measured without gradient only if `measure`.
    - gd: NLL of the retain answers (paper eq. 17);
    - kl: KL(p_o || p) of the next-token distributions at the answer tokens (eq. 18; the direction
      of TOFU's code), averaged over answer tokens only;
    - rr: ||phi_l(theta) - phi_l(theta_o)||^2 / d of hidden state `layer` at the answer positions (eq. 19;
      averaged over the d hidden dimensions, the MSE of the original RMU's retain term, like rmu.py)."""
    if reg == "none":
        return torch.zeros((), device=batch["input_ids"].device), nll(model, batch, n_tok) if measure else None
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    out = model(**inputs, output_hidden_states=reg == "rr")
    logp, mask = token_logprobs(out.logits, batch["labels"])
    retain_nll = -(logp * mask).sum() / n_tok
    if reg == "gd":
        return retain_nll, retain_nll.item()
    with torch.no_grad():
        ref = ref_model(**inputs, output_hidden_states=reg == "rr")
    if reg == "kl":
        logq, logq_o = (x[:, :-1].float().log_softmax(-1) for x in (out.logits, ref.logits))
        kl = (logq_o.exp() * (logq_o - logq)).sum(-1)  # B x (T-1), position t predicts token t+1
        return (kl * mask).sum() / n_tok, retain_nll.item()
    dist = (out.hidden_states[layer] - ref.hidden_states[layer]).float().pow(2).mean(-1)[:, :-1]  # MSE over d
    return (dist * mask).sum() / n_tok, retain_nll.item()


# ----------------------------------------------------------------------------- optimizer and schedule

def make_optimizer(params, optim: str, lr: float):
    """AdamW with TOFU's weight decay of 0.01, or plain SGD, over the trainable parameters."""
    params = [p for p in params if p.requires_grad]  # with LoRA: the adapters
    if optim == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total` (the schedule of
    the Hugging Face Trainer that TOFU and the paper's code use)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def set_lr(optimizer, lr: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def check_micro_batches(n_rows: int, args):
    """Under torchrun every micro-batch of an epoch over `n_rows` rows (the last, short batch
    included) must have a row for each process: raises UsageError otherwise."""
    last = n_rows % args.batch_size or args.batch_size  # an epoch's last batch may be short
    smallest = min(b // min(args.grad_accum, b) for b in (args.batch_size, last))  # as unlearn_batches cuts them
    if smallest < world()[1]:
        raise UsageError(f"a micro-batch of {smallest} row(s) cannot be split over {world()[1]} processes: "
                         f"raise --batch-size / lower --grad-accum, or use fewer processes")


def steps_for(n_rows: int, args) -> tuple:
    """(steps per epoch, total steps, warm-up steps) for `n_rows` training rows; checks the
    micro-batches (check_micro_batches)."""
    check_micro_batches(n_rows, args)
    per_epoch = math.ceil(n_rows / args.batch_size)
    total = max(1, math.ceil(per_epoch * args.epochs))
    if args.max_steps:
        total = min(total, args.max_steps)
    return per_epoch, total, min(total, round(per_epoch * args.warmup_epochs))


class NonFinite(Exception):
    """A NaN or infinite loss or gradient (the run stops before the step is taken), or a NaN or infinite
    value in an evaluation's mean (never counted as a number). `cli` reports it in one line, exit status 1."""


def clip_and_step(model, optimizer, max_grad_norm: float, step: int) -> float:
    """Clip the gradient norm (0 = off), take the optimizer step, clear gradients; the norm before
    clipping. A non-finite norm (a NaN or inf loss gives one) raises NonFinite naming `step`."""
    norm = full(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf")))
    if not torch.isfinite(norm):
        raise NonFinite(f"non-finite loss or gradient at step {step}: stopped before the update, no model saved")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def set_seed(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- several processes (torchrun)
# Under `torchrun --nproc_per_node N` every process runs the same script: the model is sharded with
# FSDP2 (one unit per decoder layer), each micro-batch's rows are dealt out to the processes, the
# losses are normalised by the counts of the whole step and the gradients are summed, not averaged,
# so a step is the same step as in one process. Only rank 0 prints, logs and saves.

# what torchrun sets in each process's environment (a build that run_finetune starts is one process)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def world() -> tuple:
    """(rank, number of processes): (0, 1) in a plain run; read from torchrun's environment
    before the process group is up."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def init_distributed():
    """Under torchrun: start the process group (NCCL on CUDA, gloo on CPU), pin this process to
    its GPU and silence the other ranks' stdout. A no-op in a plain run or when already started."""
    import torch.distributed as dist
    from datetime import timedelta
    size = world()[1]
    if size == 1 or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        die(f"WORLD_SIZE is {size} but this is no torchrun launch (MASTER_ADDR is unset): unset WORLD_SIZE "
            f"or start the script with torchrun", every_rank=True)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            die(f"process {local} of this machine has no GPU of its own ({torch.cuda.device_count()} GPUs): "
                f"use --nproc_per_node {torch.cuda.device_count()} or fewer", every_rank=True)
        torch.cuda.set_device(local)
    # rank 0 alone may spend long minutes on a download or on writing a 7B model while the others wait
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")


def shard(rows: list) -> list:
    """This process's share of a micro-batch's rows (all of them in a plain run)."""
    rank, size = world()
    return rows[rank::size]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's decoder layers, found by structure, not by name: the outermost ModuleList whose
    length is config.num_hidden_layers (model.layers in Llama, Phi, Qwen2; transformer.h in GPT-2;
    gpt_neox.layers in GPT-NeoX). Raises UsageError when there is none, or more than one."""
    n = getattr(model.config, "num_hidden_layers", None)
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and n and len(m) == n]
    inner = {id(s) for m in found for s in m.modules() if s is not m}  # e.g. n experts inside a layer
    found = [m for m in found if id(m) not in inner]
    if len(found) != 1:
        raise UsageError(f"cannot find the decoder layers of this {type(model).__name__}: it has "
                         f"{len(found) or 'no'} ModuleList(s) of config.num_hidden_layers ({n}) modules, not one "
                         f"(the G-effect's layer groups and torchrun's sharding need them)")
    return found[0]


def shard_model(model):
    """FSDP2 under torchrun: each decoder layer one unit, the rest (embeddings, final norm, output
    layer) the root unit; the parameters become DTensor shards on this process's device, filled with
    rank 0's weights (the other processes may hold an empty skeleton on the meta device). The
    gradient is the sum over processes (each holds its share of a step's rows and divides by the
    step's total count). Returns `model` unchanged in a plain run."""
    if world()[1] == 1:
        return model
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    full = model.state_dict() if is_main() else {}  # rank 0's weights, broadcast into every shard below
    for layer in decoder_layers(model):
        fully_shard(layer)
    # the root reshards after forward too: a forward outside training (an evaluation, a logged NLL)
    # must not leave unsharded parameters behind, which the next step's update would make stale
    fully_shard(model, reshard_after_forward=True)
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):  # a plain SUM (gloo has no pre-multiplied sum)
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    if any(p.device.type == "meta" for p in model.parameters()):
        model.to_empty(device=device_and_dtype()[0])  # storage for this process's shards
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for b in model.buffers():  # the buffers outside the state dict (e.g. rotary frequencies)
        dist.broadcast(b, src=0)
    return model


def all_sum(values: dict) -> dict:
    """Sum a dict of numbers over the processes (each holds its share of a step): one all-reduce."""
    if world()[1] == 1:
        return dict(values)
    import torch.distributed as dist
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device_and_dtype()[0])
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def full(t):
    """A DTensor (a sharded parameter, gradient or norm) as an ordinary tensor; others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local(t):
    """This process's shard of a DTensor; an ordinary tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def rank0_first(load):
    """`load()` on rank 0 first, then on the other processes, which then find what rank 0 fetched
    from the hub in the local cache. A UsageError anywhere stops every process together: rank 0's
    is printed by rank 0, another process's by that process, marked with its rank."""
    rank, size = world()
    if size == 1:
        return load()
    result = None
    for first in (True, False):
        error = None
        if (rank == 0) == first:
            try:
                result = load()
            except UsageError as e:
                error = e
        if all_sum(dict(failed=error is not None))["failed"]:
            if error is not None and rank != 0:
                say_error(str(error), every_rank=True)
            raise error or UsageError("another process failed: its line above says why")
    return result


def barrier():
    """Wait for every process under torchrun (a no-op in one process)."""
    if world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


def release():
    """Give memory back now: a model dropped under FSDP2 sits in reference cycles until a collection."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def single_process(script: str):
    """Raise UsageError when launched by torchrun: `script` runs in one process."""
    if world()[1] > 1:
        raise UsageError(f"{script} runs in one process: start it with python, not torchrun")


# ----------------------------------------------------------------------------- LoRA (peft)

def check_lora(args):
    """Raise UsageError on bad --lora-* flags."""
    if args.lora_r < 0 or args.lora_alpha <= 0 or not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora-r must be >= 0, --lora-alpha > 0 and --lora-dropout in [0, 1), got "
                         f"{args.lora_r}, {args.lora_alpha:g} and {args.lora_dropout:g}")
    if args.lora_r and world()[1] > 1:
        raise UsageError("--lora-r runs in one process: FSDP2 sharding of peft adapters is not supported here "
                         "(start it with python, not torchrun)")


def add_lora(model, args):
    """`model` wrapped in peft LoRA adapters of rank args.lora_r on args.lora_targets ('all-linear':
    every nn.Linear but the output layer, found by peft from the model itself, no per-model table).
    peft freezes the base weights: only the adapters train. Seeded, so a run is reproducible."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("--lora-r needs peft: pip install peft")
    targets = args.lora_targets if args.lora_targets == "all-linear" else \
        [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)  # B = 0 and A random: the run starts at theta_o whatever the seed
    try:
        with quiet_peft():
            return get_peft_model(model, config)
    except ValueError as e:
        raise UsageError(f"--lora-targets {args.lora_targets}: {(str(e).splitlines() or [''])[0][:200]}")


@contextlib.contextmanager
def quiet_peft():
    """peft asks transformers a deprecated question (is_gradient_checkpointing): not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


class AdaptersOff:
    """theta_o of a LoRA run, without a second copy of the base model in memory: the model itself
    with its adapters disabled, in eval mode (as a frozen reference model is). The base weights are
    frozen, so this is exactly the original model at every step."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.model(*args, **kwargs)
        finally:
            self.model.train(training)

    def __getattr__(self, name):  # .device, .config, ... of the model
        return getattr(self.model, name)


# -------------------------------------- run folders: written atomically, marked as ours, logged; the command-line entry

def default_out(script: str, args) -> str:
    """out/<method>-<model>-<split>, or out/<method>-<model>-<source>-<split> on data other than the
    preset's (source_slug: a run on other data never replaces this one), unless --out says otherwise."""
    own = data_source(args.data) == PRESETS.get(args.model, OTHER)["data"]
    name = "-".join([Path(script).stem, args.model.replace("/", "_")] + ([] if own else [source_slug(args.data)]))
    return args.out or str(OUT / f"{name}-{args.split}")


def inside(path, folder) -> bool:
    """True when `path` is `folder` or lies under it (symbolic links resolved)."""
    path, folder = Path(os.path.realpath(os.path.expanduser(path))), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def arithmetic() -> dict:
    """What a run's bytes depend on besides its flags: the libraries' versions and the CPU kernels."""
    import tokenizers
    import transformers
    return dict(torch=torch.__version__, transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                cpu_kernels=torch.backends.cpu.get_cpu_capability(), mkl_cbwr=os.environ.get("MKL_CBWR"),
                cpu_vendor=cpu_info()[0])


# Every folder this project writes for a run carries MARKER: which script wrote it and which of its
# entries are the run's own. That mark, not the mere presence of a config.json, is what lets a run
# replace a folder: anything else at --out is a user's, and is never deleted.
PROJECT = "rethinking-llm-unlearning"
MARKER = "run.json"


def read_marker(folder) -> dict:
    """The mark this project left in `folder` (MARKER), or None: no mark, or not this project's."""
    try:
        mark = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and mark.get("written_by") == PROJECT else None


def write_marker(folder, mark: dict):
    """Write `folder`'s mark atomically."""
    tmp = Path(folder) / f"{MARKER}.{os.getpid()}.tmp"  # processes that start together (sweep.py's shards)
    tmp.write_text(json.dumps(dict(mark, written_by=PROJECT), indent=2) + "\n")
    os.replace(tmp, Path(folder) / MARKER)


def register(path):
    """Count a file written later into a run folder (eval.json, uwc.json, a sweep's row.json) as the
    run's own, so that replacing the run replaces it too. A folder without the mark is left as it is."""
    folder, name = Path(path).parent, Path(path).name
    mark = read_marker(folder)
    if mark is not None and name not in mark.get("files", []):
        write_marker(folder, dict(mark, files=sorted(mark.get("files", []) + [name])))


def own_file(path) -> bool:
    """True for a file this project wrote: listed in its folder's mark, or a JSON object marked as ours."""
    mark = read_marker(Path(path).parent)
    if mark is not None and Path(path).name in mark.get("files", []):
        return True
    try:
        return json.loads(Path(path).read_text()).get("written_by") == PROJECT
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out, overwrite: bool = False, what: str = "--out", cache: bool = False) -> Path:
    """Raise UsageError unless a run may write folder `out`, having touched nothing: a new or empty
    folder, or (with --overwrite) a run folder this project wrote; never inside the tiny preset's models
    (out/tiny), which only finetune.py's own builds write (`cache`). Its twin <out>.tmp, where the run is
    written before it moves into place, must be absent or a run of ours that was stopped half-way (not
    one still running). Returns the absolute path that was checked, the one to write."""
    out = Path(os.path.abspath(os.path.expanduser(out)))
    if not cache and inside(out, tiny_dir("builtin")):
        raise UsageError(f"{what} {out} is where the tiny preset keeps its models, which only finetune.py's own "
                         f"builds write: choose another {what}")
    here = Path.cwd().resolve()
    if out.is_symlink():
        raise UsageError(f"{what} {out} is a symbolic link: give the folder it points to")
    if out.resolve() == here or out.resolve() in here.parents:
        raise UsageError(f"{what} {out} is the current folder or holds it: give a folder of the run's own")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what} {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        mark = read_marker(out)
        if mark is None:
            names = sorted(p.name for p in out.iterdir())
            raise UsageError(f"{what} {out} holds files this project did not write ({', '.join(names[:3])}"
                             f"{', ...' if len(names) > 3 else ''}): nothing was touched; give a new or empty folder")
        if not overwrite:
            raise UsageError(f"{out} holds a {mark.get('script', 'run')} run already: pass --overwrite to replace "
                             f"it, or choose another {what}")
    tmp = out.with_name(out.name + ".tmp")
    mark = read_marker(tmp) if tmp.is_dir() else None
    if tmp.exists() and mark is None and not (tmp.is_dir() and not any(tmp.iterdir())):
        raise UsageError(f"{tmp}, where the run is written before it moves to {out}, exists and is not a run "
                         f"of this project's: move it away")
    if mark is not None and mark.get("pid") != os.getpid() and running(mark):
        raise UsageError(f"{tmp} is being written by a run still going ({mark.get('script')}, process "
                         f"{mark.get('pid')} on {mark.get('host')}): wait for it, or choose another {what}")
    return out


def running(mark: dict) -> bool:
    """Whether the process a half-written run's mark names may still be writing it: alive on this host,
    or on another host (which cannot be asked: the run's folder is then left to the user)."""
    if mark.get("host") != socket.gethostname():
        return mark.get("host") is not None
    try:
        os.kill(int(mark.get("pid")), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class Run:
    """A run folder written atomically: everything goes to `<out>.tmp` and is renamed to `<out>`
    once the model is saved, so an interrupted run never leaves a half-written model at `<out>`.
    `<out>` must be new, empty, or (with --overwrite) a run folder of this project's (check_out);
    replacing one removes that run's own files only, and a user's files in it move to the new run.
    `mark`: more fields for the folder's mark (finetune.py's recipe). Under torchrun only rank 0
    writes; the others keep no files."""

    def __init__(self, out: str, args, mark: dict = None):
        self.out = Path(out)  # as given, for the messages; self.path is what was checked and is written
        try:
            self.path = check_out(self.out, getattr(args, "overwrite", False), cache="recipe" in (mark or {}))
        except UsageError as e:
            die(str(e))
        barrier()  # every process has checked --out before rank 0 writes next to it
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._log = None
        self.mark = dict(dict(script=Path(sys.argv[0]).name), **(mark or {}), complete=False, pid=os.getpid(),
                         host=socket.gethostname())
        if not is_main():
            return
        shutil.rmtree(self.tmp, ignore_errors=True)  # a stopped run's (check_out)
        self.tmp.mkdir(parents=True)
        write_marker(self.tmp, self.mark)
        argv = [Path(sys.argv[0]).name] + sys.argv[1:]
        meta = dict(vars(args), command=" ".join(argv), **arithmetic())
        (self.tmp / "args.json").write_text(json.dumps(meta, indent=2) + "\n")
        self._log = open(self.tmp / "log.jsonl", "w")

    def log(self, row: dict, line: str = None):
        """Append one JSON row to log.jsonl; print `line` when given (rank 0 only)."""
        if self._log is None:
            return
        self._log.write(json.dumps(row) + "\n")
        self._log.flush()
        if line:
            print(line, flush=True)

    def log_step(self, step: int, total: int, row: dict):
        """Append the step's numbers to log.jsonl and print them on one line, fixed fields first."""
        row = dict(step=step, **row)
        fields = [k for k in ("loss", "objective", "reg", "forget_nll", "retain_nll") if k in row]
        fields += [k for k in row if k not in fields + ["step", "lr", "grad_norm", "tok_s"]] + ["lr", "grad_norm"]
        show = lambda v: "-" if v is None else f"{v:.3e}" if 0 < abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4f}"
        self.log(row, f"step {step}/{total} | " + " | ".join(f"{k} {show(row[k])}" for k in fields)
                 + f" | tok/s {row['tok_s']:.0f}")

    def save(self, model, tokenizer, extra: dict = None, weights: bool = True):
        """save_pretrained (safetensors) into the run folder and move it into place. Under torchrun
        the shards are gathered into one full state dict on rank 0, which writes an ordinary folder.
        weights=False (--no-save) moves the logs and `extra` into place without the model. A LoRA
        model is saved merged (AutoModelForCausalLM loads it), with the adapter alone in `adapter/`;
        merging is done in place, so the model is no longer a peft model afterwards."""
        state = None
        if not weights:
            model = None
        elif world()[1] > 1:  # collective: every rank takes part, rank 0 receives the full tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if is_main():
            self._write(model, tokenizer, extra, state)
        barrier()  # the folder is in place before any rank goes on (and may read it)
        return self.out

    def _write(self, model, tokenizer, extra, state):
        self._log.close()
        from transformers.utils import logging
        logging.disable_progress_bar()  # one line per saved model is enough
        if model is not None and is_lora(model):  # the adapter beside an ordinary folder of theta_o + BA
            # the adapter alone (peft would otherwise look the base model up on the hub)
            model.save_pretrained(self.tmp / "adapter", safe_serialization=True, save_embedding_layers=False)
            model = model.merge_and_unload()  # in place: the run is over
        if model is not None:
            model.save_pretrained(self.tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(self.tmp)
        for name, obj in (extra or {}).items():
            (self.tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        write_marker(self.tmp, dict(self.mark, complete=True, files=sorted({p.name for p in self.tmp.iterdir()})))
        old = None
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:  # two renames, not interrupted: <out> is a whole run, the new one or the old one
            if self.path.exists():  # empty, or a run of ours (check_out): set aside whole, under a new name
                old = Path(tempfile.mkdtemp(prefix=f"{self.path.name}.replaced-", dir=self.path.parent))
                os.replace(self.path, old)
            os.replace(self.tmp, self.path)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if old is None:
            return
        mark = read_marker(old)  # what is not the old run's own is the user's: it moves to the new run
        own = set(mark.get("files", [])) | {MARKER} if mark else set()
        kept = []
        for p in old.iterdir():
            if p.name in own:
                continue
            try:
                if (self.path / p.name).exists():  # the new run writes the same name
                    raise FileExistsError(p.name)
                os.replace(p, self.path / p.name)
            except OSError:
                kept.append(p.name)
        if kept:  # nothing of the user's is ever deleted: the old folder stays, with a word
            warn(f"{', '.join(sorted(kept))} in {self.out} were not the run's own and could not move to the new run "
                 f"(the same name, or a rename refused): the old folder is kept as {old}")
        else:
            shutil.rmtree(old)  # the replaced run's own files only


def _interrupt(*_):
    raise KeyboardInterrupt


def cli(main):
    """Run a script's main(): Ctrl-C or SIGTERM, and a non-finite loss or metric, stop it with one line on
    stderr; run folders are written atomically, so no half-written model is left behind. A non-finite
    number exits with status 1, not bad input's 2: the flags were fine, the numbers they gave were not."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except KeyboardInterrupt:
        if is_main():
            print(f"{Path(sys.argv[0]).name}: interrupted: no model was written", file=sys.stderr)
        sys.exit(130)
    except NonFinite as e:
        say_error(str(e))
        sys.exit(1)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
