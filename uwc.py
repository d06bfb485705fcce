"""
UWC: unlearning with control (Wang et al., 2025; the paper's Appendix B.2). An unlearned model
theta_u is mixed back with the original theta_o,

    theta(lam) = (1 - lam) theta_o + lam theta_u,

with the largest lam in [0, 1] that keeps ES-exact on the 400 held-out retain rows at least
(1 - tol) x that of theta_o: lam = 1 is tried first, then bisection to 0.01 (at most 8
evaluations; it assumes the retain ES falls as lam grows). Methods are then compared on what
they still remove at equal retention. --tol defaults to the preset's: 10% for tiny and phi-1.5,
5% for Llama-2-7B.

    python uwc.py --model out/wga-tiny-forget05                      # -> out/wga-tiny-forget05-uwc

--split defaults to the forget split the run was unlearned on (its args.json), else forget05; a
--split given otherwise wins, with one warning line. The mixed model is an ordinary model folder,
with uwc.json (lam*, every probe, the final metrics), eval.json and an args.json that records the
split, data, template and original model, so that eval_tofu.py on it alone scores what was mixed;
the Table 1 row at lam* is printed. Mixing streams over the parameters in place, reading theta_o
and theta_u tensor by tensor from their safetensors files: the model in memory is the only full
copy. Weights that do not match the model tensor for tensor (a missing or extra tensor, another
shape) are refused in one line before anything is mixed. A LoRA run (its folder has adapter/) is
mixed exactly and cheaply: theta_o + lam BA is theta_o with the adapter scaled by lam. The paper's
tuning of every method under UWC (Tables 2-10) and its Table 1 built from it: sweep.py.
"""
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open

import common
import eval_tofu


# ----------------------------------------------------------------------------- mixing and search

def safetensors_files(path: str) -> dict:
    """{tensor name: file} of a model folder or hub id (sharded or not), safetensors only."""
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download
        try:
            path = snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
        except Exception as e:
            raise common.UsageError(f"cannot find the weights of '{path}' (not a folder; hub unreachable?): "
                                    f"{str(e).splitlines()[0][:150]}")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise common.UsageError(f"no safetensors weights in '{path}'")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def check_tensors(state: dict, original: dict, unlearned: dict, handles: dict):
    """Raise UsageError, in one line, unless the unlearned and original weights (safetensors_files maps;
    `handles`: open files, filled) hold exactly the model's tensors, in its shapes. A tensor tied to one
    that is stored (lm_head to the embeddings: save_pretrained keeps one) may be absent."""
    stored = [k for k in state if k in unlearned]
    held = {state[k].data_ptr() for k in stored}
    extra = [k for k in unlearned if k not in state]
    lacking = [k for k in state if k not in unlearned and state[k].data_ptr() not in held]  # and not tied to one held
    no_original = [k for k in stored if k not in original]
    for names, what in ((extra, "the unlearned weights hold tensors the model does not have"),
                        (lacking, "the unlearned weights lack tensors of the model"),
                        (no_original, "the original model lacks tensors of the unlearned one")):
        if names:
            raise common.UsageError(f"cannot mix: {what} ({len(names)}, e.g. {names[0]}): not the same architecture")
    for name in stored:
        for who, files in (("unlearned", unlearned), ("original", original)):
            if files[name] not in handles:
                handles[files[name]] = safe_open(files[name], "pt", device="cpu")
            shape = tuple(handles[files[name]].get_slice(name).get_shape())
            if shape != tuple(state[name].shape):
                raise common.UsageError(f"cannot mix: {name} is {shape} in the {who} weights but "
                                        f"{tuple(state[name].shape)} in the model: not the same architecture")


@torch.no_grad()
def mix_(model, original: dict, unlearned: dict, lam: float):
    """Set the model's parameters to (1 - lam) theta_o + lam theta_u in place, one tensor at a time
    (`original`, `unlearned`: safetensors_files maps). lam 0 and 1 copy the tensors exactly. Weights that
    do not match the model tensor for tensor raise UsageError before any tensor is touched (check_tensors)."""
    state, handles = model.state_dict(), {}
    check_tensors(state, original, unlearned, handles)
    for name, file in unlearned.items():
        u = handles[file].get_tensor(name)
        if lam == 1:
            state[name].copy_(u)
            continue
        o = handles[original[name]].get_tensor(name)
        state[name].copy_(o if lam == 0 else o.float().lerp_(u.float(), lam))  # (1 - lam) o + lam u


@torch.no_grad()
def mix_state_(model, original: dict, unlearned: dict, lam: float):
    """mix_ from tensors in memory ({name: tensor}, e.g. a state_dict and a CPU copy): the same
    arithmetic, so the same weights as mixing the saved folders."""
    for name, p in model.state_dict().items():
        u = unlearned[name]
        if lam == 1:
            p.copy_(u)
            continue
        o = original[name]
        p.copy_(o if lam == 0 else torch.lerp(o.float(), u.to(o.device).float(), lam))  # (1 - lam) o + lam u


def scale_adapter(model):
    """For a LoRA run (a peft model of theta_o and the run's adapter): a function lam -> sets every
    adapter's B to lam x its trained value, so that the model is theta_o + lam BA, the same model
    as mixing theta_o with the merged theta_o + BA, for the price of the adapter alone. The base
    weights are never touched, and the adapter saved with the mixed model is the scaled one."""
    trained = {name: p.detach().clone() for name, p in model.named_parameters()
               if ".lora_B." in name or ".lora_embedding_B." in name}
    if not trained:
        raise common.UsageError("the run's adapter/ holds no LoRA weights (lora_B)")
    params = dict(model.named_parameters())

    @torch.no_grad()
    def set_lam(lam):
        for name, b in trained.items():
            params[name].copy_(b * lam)
    return set_lam


def search(retain_es, target: float, resolution: float = 0.01, at_zero: float = None):
    """The largest lam in [0, 1] with retain_es(lam) >= target, on bisection's grid: lam = k / n, n = 128 for a
    resolution of 0.01 (the points that halving [0, 1] seven times reaches, rounded to 6 decimals as it rounds
    them). lam = 1 first. Then, between a feasible lo (0 at first: the original, whose retain ES is `at_zero`) and
    an infeasible hi, each probe is a guess: the drop d(lam) = at_zero - retain_es(lam) is taken to grow as
    c lam^p, through the two probes whose drops are nearest the target's (p = 2 while there is one), and the
    probe is the grid point nearest where it meets the target. The middle instead when there is no guess (no
    `at_zero`, no growing drop) and when the last two probes have not halved the bracket. It ends when lo and hi
    are neighbours. Where the retain ES falls as lam grows (the search's assumption, measured in
    benchmarks/uwc_curves.py) that is bisection's lam* exactly, in fewer probes. Returns (lam, probes)."""
    n = 2 ** max(0, math.ceil(math.log2(1 / resolution)))
    probes, drops = [], {}  # drops: grid index -> at_zero - retain ES, where positive

    def es(k):
        lam = round(k / n, 6)
        v = retain_es(lam)
        probes.append(dict(lam=lam, retain_es=v, feasible=v >= target))
        if at_zero is not None and at_zero - v > 0:
            drops[k] = at_zero - v
        return v

    if es(n) >= target:
        return 1.0, probes
    lo, hi, widths = 0, n, [n]  # widths: the bracket's after each probe
    while hi - lo > 1:
        k = (lo + hi) // 2
        if at_zero is not None and at_zero > target and not (len(widths) >= 3 and 2 * (hi - lo) > widths[-3]):
            want = at_zero - target
            near = sorted(drops, key=lambda j: abs(drops[j] - want))[:2]
            p = 2.0 if len(near) == 1 else math.log(drops[near[1]] / drops[near[0]]) / math.log(near[1] / near[0])
            if p > 0:
                k = min(max(round(near[0] * (want / drops[near[0]]) ** (1 / p)), lo + 1), hi - 1)
        if es(k) >= target:
            lo = k
        else:
            hi = k
        widths.append(hi - lo)
    return round(lo / n, 6), probes


# ----------------------------------------------------------------------------- one model

def run_uwc(args):
    """Search lam*, save the mixed model, evaluate it; returns uwc.json's content."""
    t0 = time.time()
    out = args.out or f"{args.model.rstrip('/')}-uwc"
    common.check_out(out, args.overwrite)  # before the search: a new folder, or a run of ours with --overwrite
    run_args = common.run_args(args.model)  # {} without one; a broken one is a UsageError naming it
    preset, data, template = eval_tofu.model_defaults(args.model, args.model)
    warnings = eval_tofu.recorded_flags("uwc.py", args.model, args, template)  # --split: the run's unless given
    original = args.original or run_args.get("model")
    if original is None:
        raise common.UsageError(f"{args.model} has no args.json naming its original model: give --original")
    tol = args.tol if args.tol is not None else common.PRESETS.get(preset, common.OTHER)["uwc_tol"]
    if not 0 <= tol < 1:
        raise common.UsageError(f"--tol must be in [0, 1), got {tol}")
    for w in warnings:
        common.warn(w)
    # recorded in the mixed folder's args.json: eval_tofu.py on it alone finds the run's data, template and preset
    args.data, args.original = data, original
    original_path = common.model_path(original, data)
    split = common.split_data(args.split, data)
    tokenizer = common.load_tokenizer(args.model)
    adapter = os.path.join(args.model, "adapter")
    # a LoRA run mixed with the model it was trained from: scale its adapter (any other original, or a
    # folder that is not a LoRA run, such as a -uwc output that carries a scaled adapter: mix the weights)
    trained_from = run_args.get("model") and common.model_path(run_args["model"], data)
    if run_args.get("lora_r") and original_path == trained_from and \
            os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        model = common.load_model(original_path, frozen=True)
        from peft import PeftModel
        with common.quiet_peft():
            model = PeftModel.from_pretrained(model, adapter).eval()
        set_lam = scale_adapter(model)
    else:
        unlearned = safetensors_files(args.model)
        base = safetensors_files(original_path)
        model = common.load_model(args.model, frozen=True)
        set_lam = lambda lam: mix_(model, base, unlearned, lam)

    def retain_es(lam):
        set_lam(lam)
        return eval_tofu.mean(eval_tofu.es_exact(model, tokenizer, split["retain_eval"], template, args.batch_size,
                                                 with_eos=args.es_eos), "ES-exact", "held-out retain")

    at_zero = retain_es(0.0)
    target_es = at_zero * (1 - tol)
    if args.min_forget_es:  # at lam 0 the model is theta_o: does it know the forget rows at all?
        original_es = eval_tofu.mean(eval_tofu.es_exact(model, tokenizer, split["forget"], template, args.batch_size,
                                                        with_eos=args.es_eos), "ES-exact", "forget")
        eval_tofu.forget_es_warning(original_es, args.min_forget_es, f"the original model {original_path}")
    lam, probes = search(retain_es, target_es, at_zero=at_zero)
    for p in probes:
        print(f"lam {p['lam']:.4f} | retain ES-exact {p['retain_es']:.4f} | {'ok' if p['feasible'] else 'too low'}")
    print(f"lam* = {lam:.4f} (retain ES-exact >= {target_es:.4f} = (1 - {tol:g}) x original)", flush=True)
    set_lam(lam)

    # save the mixed model as an ordinary folder (and a LoRA run's scaled adapter), atomically, then its Table 1 row
    run = common.Run(out, args)
    run.save(model, tokenizer)
    argv = ["--model", out, "--split", args.split, "--data", data, "--template", template,
            "--batch-size", str(args.batch_size)] + (["--max-samples", str(args.max_samples)] if args.max_samples else [])
    argv += ["--es-eos"] if args.es_eos else []
    if args.no_fq:
        argv += ["--no-fq"]
    elif args.retain_stats:
        argv += ["--retain-stats", args.retain_stats]
    elif preset == "tiny":  # the tiny preset's retain-only model of this data, built on first use
        argv += ["--retain-model", eval_tofu.tiny_retain_model(args.split, data)]
    res = eval_tofu.main(argv)
    result = dict(model=args.model, original=original_path, split=args.split, tol=tol, lam=lam, es_eos=args.es_eos,
                  target_retain_es=target_es, probes=probes, summary=res["summary"], seconds=time.time() - t0)
    eval_tofu.write_json(os.path.join(out, "uwc.json"), result)
    return result


def main(argv=None):
    parser = common.make_parser(__doc__)
    a = parser.add_argument
    a("--model", default=None, help="the unlearned run folder")
    a("--original", default=None, help="the model before unlearning (default: the run's --model in args.json)")
    a("--split", default=None, help="forget01, forget05 or forget10 (default: the forget split the run was "
                                    "unlearned on, from its args.json; else forget05)")
    a("--tol", type=float, default=None, help="allowed drop of retain ES-exact (default: the preset's)")
    a("--out", default=None, help="folder of the mixed model: new, empty, or a run of this project's "
                                  "(default: MODEL-uwc)")
    a("--retain-stats", default=None, help="the retain-only model's eval.json, for Forget Quality")
    a("--no-fq", action="store_true", help="skip Forget Quality in the final evaluation (and the tiny preset's "
                                           "retain-only fine-tune): reported n/a (skipped)")
    a("--max-samples", type=int, default=None, help="final evaluation on the first N rows of each set only")
    a("--batch-size", type=int, default=64, help="rows per forward pass")
    a("--overwrite", action="store_true", help="replace the run already in --out (a folder this project did not "
                                               "write is never touched)")
    a("--es-eos", action="store_true", help="ES counts the EOS token, in the search and the evaluation: the stricter "
                                            "'must also stop' reading (default: EOS left out, as the authors' ES)")
    common.add_min_forget_es(parser)
    args = parser.parse_args(argv)
    try:
        common.single_process("uwc.py")
        if not args.model or not os.path.isdir(args.model):
            raise common.UsageError(f"--model must be an unlearned run folder, got {args.model!r}")
        if args.split is not None and args.split not in common.SPLITS:
            raise common.UsageError(f"unknown split '{args.split}' (choose from {', '.join(common.SPLITS)})")
        if args.no_fq and args.retain_stats:
            raise common.UsageError("--no-fq and --retain-stats exclude each other")
        return run_uwc(args)
    except common.UsageError as e:
        common.die(str(e))


if __name__ == "__main__":
    common.cli(main)
