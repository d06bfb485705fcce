"""
Sweep: the paper's experimental protocol, in its two stages (Section 5, Appendix G).

1. Tuning under UWC (Tables 2-10). For each method and split, every value of the method's grid
   is run with KL, mixed back with the original model by UWC (uwc.py) to the preset's retention,
   and scored by what it still removes: ES-exact and ES-perturb on the forget rows and the
   held-out retain rows, after UWC. The grids are the paper's: WGA alpha, NPO and TNPO beta in
   {0.05, 0.1, 0.5, 0.7, 1, 2, 4, 5, 7, 10}; WTNPO alpha in {0.5, 1, 1.5} x that beta grid
   (Tables 5-7); RMU c in {0, 1, 2, 4, 5, 7, 10} at a shallow, a middle and a deep hidden state
   (Tables 8-10: the paper's 11th, 22nd and 33rd of Llama-2-7B's 33, the last being the one
   before unembedding; here round(k (L+1) / 3) - 1 for k = 1, 2, 3 of the L + 1 states). After the
   paper's seven, four more objectives with grids of this project's choosing: SimNPO beta in that
   beta grid x gamma in {0, 1}; SatImp beta1 in {1, 3, 5} x beta2 in {0.1, 0.5, 1}; IdkDPO beta in
   that beta grid; UNDIAL beta in {1, 3, 10, 30, 100}.
2. Table 1 as the paper builds it: every method at its best value (the lowest unlearn ES-exact
   after UWC; ties: ES-perturb, then retain ES-exact), the UNMIXED unlearned model, evaluated fully (ES, MU, and FQ
   against the retain-only model), with KL. Beside it, the same picks after UWC: the comparison
   at equal retention, which is this project's addition, not the paper's Table 1.

    python sweep.py --method wga --split forget05
    python sweep.py --method all --split all              # tiny preset, built-in set: all of it
    python sweep.py --model phi-1.5 --method npo --split forget05 --retain-model RETAIN_FOLDER  # GPU

Everything goes to --out (default out/sweep/<preset>/): sweep.json (every row and the picks),
tables.md (Tables 2-10 in the paper's layout), table1.md / table1.json, and one figure per
tuning table (tuning-<method>[-<fixed param>].png; `python figures.py tuning FOLDER` redraws them
from sweep.json). One process: the original model, the data and the reference model are loaded
once; each configuration starts from the original weights, runs the method script's own loop in
memory (its main() with `loaded`) and is mixed in memory with theta_o, which the frozen reference
model holds. A configuration's row is written
atomically to runs/<name>/row.json as soon as it is done, so a killed sweep started again with
the same flags skips what is finished and redoes the configuration it was in; a NaN loss or
metric stops it the same way, in one line naming the configuration (exit status 1). Unlearned
weights are kept only with --keep. --attacks adds attack.py's three attacks to Table 1, on every pick and seed (in
memory, with one control a split): ES-exact on V after relearning on T, ES-exact after 4-bit quantization, and
PrivLeak; their rows go beside Table 1's (table1/*-attacks.json), and table1-relearn.png draws ES on V against S. Table 1's log10 FQ of a p-value of 0 is null with the bound
"< -300" (eval_tofu.log10_fq). Details and the results on the built-in set: docs/tuning.md.
"""
import importlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from contextlib import contextmanager, redirect_stdout, suppress
from pathlib import Path
from types import SimpleNamespace

import torch

import attack
import common
import eval_tofu
import uwc

# Table 1's order: the paper's seven, then the four objectives it does not study
METHODS = ("ga", "po", "wga", "npo", "tnpo", "wtnpo", "rmu", "simnpo", "satimp", "idkdpo", "undial")
NAMES = dict(ga="GA", po="PO", wga="WGA", npo="NPO", tnpo="TNPO", wtnpo="WTNPO", rmu="RMU", simnpo="SimNPO",
             satimp="SatImp", idkdpo="IdkDPO", undial="UNDIAL")
GRID = (0.05, 0.1, 0.5, 0.7, 1, 2, 4, 5, 7, 10)  # Tables 2-7
GRIDS = dict(ga={}, po={}, wga=dict(alpha=GRID), npo=dict(beta=GRID), tnpo=dict(beta=GRID),
             wtnpo=dict(alpha=(0.5, 1, 1.5), beta=GRID), rmu=dict(layer=("shallow", "middle", "deep"),
                                                                  c=(0, 1, 2, 4, 5, 7, 10)),
             simnpo=dict(beta=GRID, gamma=(0, 1)), satimp=dict(beta1=(1, 3, 5), beta2=(0.1, 0.5, 1)),
             idkdpo=dict(beta=GRID), undial=dict(beta=(1, 3, 10, 30, 100)))
SWEPT = dict(wga="alpha", npo="beta", tnpo="beta", wtnpo="beta", rmu="c", simnpo="beta", satimp="beta1",
             idkdpo="beta", undial="beta")  # what --grid replaces
GEN_TOKENS = 200  # Table 1's generation cap for ROUGE-L, eval_tofu.py's default (TOFU's)
MIA_K = 0.4  # Min-K%'s k for PrivLeak and Min-K%++ (eval_tofu.py's and attack.py's default)
# the values each method script accepts (its own checks, said once more so that a bad grid fails first)
VALID = dict(alpha=(lambda v: v >= 0, ">= 0"), beta=(lambda v: v > 0, "> 0"), c=(lambda v: True, "a number"),
             gamma=(lambda v: True, "a number"), beta1=(lambda v: v >= 0, ">= 0"), beta2=(lambda v: v >= 0, ">= 0"))


def paper_default(method: str, split: str, preset: dict) -> dict:
    """The paper's stated hyper-parameters (Section 5), which are the method scripts' defaults; for the
    four objectives the paper does not study, the scripts' defaults (docs/objectives.md)."""
    f10 = split == "forget10"
    return dict(ga={}, po={}, wga=dict(alpha=7.0 if f10 else 5.0), npo=dict(beta=0.5),
                tnpo=dict(beta=5.0 if f10 else 4.0), wtnpo=dict(alpha=1.5, beta=7.0 if f10 else 5.0),
                rmu=dict(layer=preset["rmu_layer"], c=preset["rmu_c"]),
                simnpo=dict(beta=4.5 if f10 else 2.5, gamma=0.0), satimp=dict(beta1=5.0, beta2=0.1),
                idkdpo=dict(beta=0.1), undial=dict(beta=10.0))[method]


def rmu_layers(n_layers: int) -> dict:
    """Shallow, middle and deep hidden state of a model with n_layers decoder layers (states 0..n):
    the paper's 11th, 22nd and 33rd of 33 (1-based) for Llama-2-7B, scaled: round(k (n+1)/3) - 1."""
    return {name: round(k * (n_layers + 1) / 3) - 1 for k, name in enumerate(("shallow", "middle", "deep"), 1)}


def grid(method: str, args, layers: dict) -> list:
    """The configurations of one method: a list of params dicts (RMU's layers resolved)."""
    spec = dict(GRIDS[method])
    if args.grid and method in SWEPT:
        spec[SWEPT[method]] = args.grid
    if method == "wtnpo" and args.wtnpo_alpha:
        spec["alpha"] = args.wtnpo_alpha
    if method == "rmu" and args.rmu_layers:
        spec["layer"] = args.rmu_layers
    keys = list(spec)
    out = []
    for values in itertools.product(*(spec[k] for k in keys)):
        p = dict(zip(keys, values))
        if "layer" in p:
            p["layer"] = layers.get(p["layer"], p["layer"])
        out.append({k: (int(v) if k == "layer" else float(v)) for k, v in p.items()})
    return out


def name_of(method: str, split: str, params: dict) -> str:
    return "-".join([method, split] + [f"{k}{v:g}" for k, v in params.items()])


def check_params(method: str, params: dict, n_layers: int):
    for k, v in params.items():
        if k == "layer":
            if not 0 <= v <= n_layers:
                raise common.UsageError(f"RMU layer {v} is out of range: the model has hidden states 0..{n_layers}")
        elif not (math.isfinite(v) and VALID[k][0](v)):
            raise common.UsageError(f"{method} rejects {k} = {v:g}: {k} must be {VALID[k][1]}")


# ----------------------------------------------------------------------------- in memory

@torch.no_grad()
def reset_(model, ref_model):
    """The trainable model back to the original weights theta_o, which the frozen reference holds."""
    ref = ref_model.state_dict()
    for k, v in model.state_dict().items():
        v.copy_(ref[k])


@torch.no_grad()
def snapshot(model) -> dict:
    """A copy of the weights on the CPU (theta_u, for UWC's mixing and for Table 1)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def retain_es_probe(model, tokenizer, examples, target, batch_size, with_eos, shortfall):
    """Mean ES-exact of `examples` as uwc.py computes it (eval_tofu.score's batches, the mean in row
    order), but it stops as soon as the rows left cannot lift the mean to `target` even at ES 1: a probe
    that UWC's search rejects costs a part. The batches go in the order of `shortfall` (batch -> sum of
    1 - ES at its last scoring in this search), largest first, which is updated: the rows that fell short
    last time decide a rejection soonest. Returns (mean, complete). Cut short, the mean is an estimate for
    the search's guesses, below `target` like the true one: each batch not scored at its last ES, scaled by
    how much the batches scored now moved since theirs (the mean of the rows scored where there is no last
    ES), kept between the mean with the rest at 0 and at 1."""
    model.eval()
    batches = eval_tofu.by_length([len(e["input_ids"]) for e in examples], batch_size)
    last = {b: len(batches[b]) - f for b, f in shortfall.items()}  # each batch's ES sum at its last scoring
    n, es = len(examples), [None] * len(examples)
    done, total, now, before = 0, 0.0, 0.0, 0.0
    order = sorted(range(len(batches)), key=lambda b: -shortfall.get(b, 0.0))
    for j, b in enumerate(order):
        idx = batches[b]  # a row's ES depends on its batch, not on when the batch is scored
        values = eval_tofu.score(model, tokenizer, [examples[i] for i in idx], batch_size, with_eos=with_eos,
                                logp=False)[1]
        for i, v in zip(idx, values):
            es[i] = v
        got = sum(values)
        shortfall[b] = len(idx) - got
        done, total = done + len(idx), total + got
        if b in last:
            now, before = now + got, before + last[b]
        if (total + (n - done)) / n < target - 1e-9:  # margin: float sums differ
            scale = now / before if before > 0 else None
            rest = sum(last[c] * scale if scale is not None and c in last else total / done * len(batches[c])
                       for c in order[j + 1:])
            return min(max((total + rest) / n, total / n), (total + n - done) / n), False
    return eval_tofu.mean(es, "ES-exact", "held-out retain"), True


class CachedReference:
    """The frozen original model, its outputs remembered by input. Every configuration of a split
    meets the same retain batches (same seed), so KL's reference forward runs once per batch, not
    once per configuration. Up to `budget` bytes of logits; past that it just runs the model."""

    def __init__(self, model, budget: int = 2 ** 30):
        self.model, self.budget, self.cache, self.bytes = model, budget, {}, 0

    def __call__(self, input_ids, attention_mask, output_hidden_states=False):
        if output_hidden_states:  # RR's hidden states are not kept
            return self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        key = (tuple(input_ids.shape), input_ids.cpu().numpy().tobytes(), attention_mask.cpu().numpy().tobytes())
        if key not in self.cache:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            if self.bytes + logits.nelement() * logits.element_size() > self.budget:
                return SimpleNamespace(logits=logits)
            self.cache[key] = logits
            self.bytes += logits.nelement() * logits.element_size()
        return SimpleNamespace(logits=self.cache[key])


class Sweep:
    """One process, one preset: the models and data loaded once, configurations run one by one."""

    def __init__(self, args):
        t0 = time.perf_counter()
        self.args = args
        self.clock = Counter()  # this process's seconds by phase (profile.json)
        preset, data, _ = eval_tofu.model_defaults(args.model, args.model)
        self.data = common.data_source(args.data or data)  # a folder by its real path, as args.json has it
        self.path = common.model_path(args.model, self.data)  # tiny: that data's own model, built on first use
        self.preset, _, self.template = eval_tofu.model_defaults(args.model, self.path)
        self.tokenizer = common.load_tokenizer(self.path)
        self.model = common.load_model(self.path)
        self.lora = None
        if getattr(args, "lora_r", 0):  # adapters on the one copy of theta_o, which is their reference with them off
            self.lora = SimpleNamespace(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                        lora_targets="all-linear", seed=args.seed)
            self.model = common.add_lora(self.model, self.lora)
            self.ref_model = common.AdaptersOff(self.model)
        else:
            self.ref_model = common.load_model(self.path, frozen=True)  # theta_o, for KL and for mixing
        self.n_layers = self.model.config.num_hidden_layers
        self.layers = rmu_layers(self.n_layers)
        self.tol = args.tol if args.tol is not None else common.PRESETS.get(self.preset, common.OTHER)["uwc_tol"]
        self.splits = {}
        self.cached_ref = None  # the reference with a cache, for the split being swept
        self.kept = {}  # (method, split) -> (row, theta_u) of the best configuration so far
        self.clock["loading the models"] += time.perf_counter() - t0

    @contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.clock[phase] += time.perf_counter() - t0

    # ------------------------------------------------------------------------- the weights: theta_o, theta_u, mixed

    def fresh(self, seed: int):
        """The trainable model at theta_o, ready for a configuration: the original weights, which the frozen
        reference holds; with LoRA, new adapters made as the method script makes them with this seed (B = 0)."""
        if self.lora is None:
            reset_(self.model, self.ref_model)
            return
        with common.quiet_peft():
            base = self.model.unload()
        self.model = common.add_lora(base, SimpleNamespace(**{**vars(self.lora), "seed": seed}))
        self.ref_model = common.AdaptersOff(self.model)
        if self.cached_ref is not None:  # the same theta_o: the remembered outputs stay
            self.cached_ref.model = self.ref_model

    def weights(self) -> dict:
        """theta_u on the CPU: every weight, or with LoRA the adapters'."""
        if self.lora is None:
            return snapshot(self.model)
        return {k: p.detach().to("cpu", copy=True) for k, p in self.model.named_parameters() if ".lora_" in k}

    @torch.no_grad()
    def mix(self, theta_u: dict, lam: float):
        """The model at theta_o + lam (theta_u - theta_o) (theta_u None: theta_o), with uwc.py's arithmetic: the
        weights mixed (uwc.mix_state_), or with LoRA the adapter scaled, B = lam x its trained value (uwc.py's
        scale_adapter: theta_o + lam BA, the base weights untouched)."""
        if self.lora is None:
            if theta_u is None:
                reset_(self.model, self.ref_model)
            else:
                uwc.mix_state_(self.model, self.ref_model.state_dict(), theta_u, lam)
            return
        params = dict(self.model.named_parameters())
        for k, v in (theta_u or {}).items():
            params[k].copy_(v * lam if ".lora_B." in k or ".lora_embedding_B." in k else v)
        if theta_u is None:
            for k, p in params.items():
                if ".lora_B." in k or ".lora_embedding_B." in k:
                    p.zero_()

    def split(self, split: str) -> dict:
        """The split's rows, encoded sets and the original model's ES (the 'before unlearning' row)."""
        if split not in self.splits:
            t0 = time.perf_counter()
            d = common.split_data(split, self.data)
            sets = eval_tofu.load_sets(split, self.data)
            enc = lambda rows, q="question": common.encode_rows(self.tokenizer, self.template, rows, question=q)
            s = dict(data=d, sets=sets, retain=enc(d["retain_eval"]), forget=enc(d["forget"]),
                     retain_perturb=enc(sets["retain"][1], "paraphrased_question"),
                     forget_perturb=enc(sets["forget"][1], "paraphrased_question"))
            self.splits[split] = s
            self.mix(None, 0.0)  # the model may hold another split's unlearned weights
            s["before"] = self.scores(s)
            # once per split, not once per configuration (those run with --min-forget-es 0)
            eval_tofu.forget_es_warning(s["before"]["es_exact_unlearn"], self.args.min_forget_es,
                                        f"the target model {self.path} on {split}")
            s["target"] = s["before"]["es_exact_retain"] * (1 - self.tol)
            self.clock["the splits' data and ES before unlearning"] += time.perf_counter() - t0
        return self.splits[split]

    def scores(self, s: dict, retain: float = None) -> dict:
        """The four ES values of the model as it is now (its eval mode on); `retain`: ES-exact on the
        held-out rows when UWC's search has measured it already."""
        self.model.eval()
        es = lambda ex, metric, where: eval_tofu.mean(eval_tofu.score(
            self.model, self.tokenizer, ex, self.args.batch_size, with_eos=self.args.es_eos, logp=False)[1], metric,
            where)
        return dict(es_exact_retain=es(s["retain"], "ES-exact", "held-out retain") if retain is None else retain,
                    es_exact_unlearn=es(s["forget"], "ES-exact", "forget"),
                    es_perturb_retain=es(s["retain_perturb"], "ES-perturb", "held-out retain"),
                    es_perturb_unlearn=es(s["forget_perturb"], "ES-perturb", "forget"))

    def unlearn(self, method: str, split: str, params: dict, run_dir: Path, keep: bool, seed: int = None) -> dict:
        """Run the method script's loop on the original weights, in memory; returns theta_u."""
        a = self.args
        argv = ["--model", a.model, "--data", self.data, "--template", self.template, "--split", split, "--reg", "kl",
                "--seed", str(a.seed if seed is None else seed), "--out", str(run_dir), "--overwrite", "--no-eval",
                "--log-every", "1000000", "--min-forget-es", "0"] + ([] if keep else ["--no-save"])
        argv += [x for k, v in (("--lr", a.lr), ("--epochs", a.epochs)) if v is not None for x in (k, f"{v:g}")]
        argv += [x for k, v in params.items() for x in (f"--{k}", f"{v:g}")]
        argv += [] if self.lora is None else ["--lora-r", str(self.lora.lora_r), "--lora-alpha", f"{self.lora.lora_alpha:g}"]
        s = self.split(split)
        self.fresh(a.seed if seed is None else seed)
        if self.cached_ref is None or self.cached_ref.split != split:  # one split's batches at a time
            self.cached_ref = CachedReference(self.ref_model)
            self.cached_ref.split = split
        loaded = (s["data"], self.tokenizer, self.model, self.cached_ref)
        with redirect_stdout(open(os.devnull, "w")):  # the run's numbers are in its log.jsonl
            importlib.import_module(method).main(argv, loaded=loaded)
        return self.weights()

    def config(self, method: str, split: str, params: dict) -> dict:
        """One row of Tables 2-10: unlearn, search lam* on the held-out retain rows, score at lam*."""
        t0 = time.time()
        s = self.split(split)
        run_dir = self.runs / name_of(method, split, params)
        with self.timed("grid: unlearning"):
            theta_u = self.unlearn(method, split, params, run_dir, self.args.keep)
        t_unlearn = time.time() - t0
        row = dict(method=method, split=split, params=params, **self.after_uwc(s, theta_u),
                   seconds=round(time.time() - t0, 2), seconds_unlearn=round(t_unlearn, 2))
        key = (method, split)
        best = self.kept.get(key)
        if best is None or rank(row) < rank(best[0]):
            self.kept[key] = (row, theta_u)  # Table 1 needs the unmixed model of the pick
        return row

    def after_uwc(self, s: dict, theta_u: dict) -> dict:
        """UWC's search for lam* on the held-out retain rows, then the four ES values at lam*."""
        probes = {}
        shortfall = {}  # the probes' batch order, from probe to probe of this search only: a configuration's
        # probes (their number is in its row) do not depend on what ran before it in the process

        def retain_es(lam):
            self.mix(theta_u, lam)
            es, complete = retain_es_probe(self.model, self.tokenizer, s["retain"], s["target"],
                                           self.args.batch_size, self.args.es_eos, shortfall)
            probes[lam] = es if complete else None
            return es

        with self.timed("UWC: the search for lambda*"):
            lam, _ = uwc.search(retain_es, s["target"], at_zero=s["before"]["es_exact_retain"])
        with self.timed("UWC: the four ES at lambda*"):
            self.mix(theta_u, lam)
            scores = dict(s["before"]) if lam == 0 else self.scores(s, probes.get(lam))  # lam 0: theta_o exactly
        return dict(lam=lam, **scores, probes=len(probes))

    def pick_weights(self, method: str, split: str, params: dict, seed: int) -> dict:
        """theta_u of a pick with an unlearning seed: the grid's kept weights at the grid's seed, else
        its run made again (the same seed gives the same weights), its logs in runs/<name>-seed<seed>."""
        kept = self.kept.get((method, split))
        if seed == self.args.seed and kept is not None and kept[0]["params"] == params:
            return kept[1]
        run_dir = self.runs / f"{name_of(method, split, params)}-seed{seed}"
        if seed == self.args.seed:  # resumed: the grid's run is not repeated on disk, only in memory
            run_dir = self.runs.parent / "scratch" / name_of(method, split, params)  # beside its row, not over it
        theta_u = self.unlearn(method, split, params, run_dir, self.args.keep and seed != self.args.seed, seed)
        if seed == self.args.seed:
            shutil.rmtree(run_dir)  # the logs of a run of ours, made just now
            with suppress(OSError):
                run_dir.parent.rmdir()
        return theta_u

    def table1_sets(self, split: str) -> dict:
        """Table 1's evaluation sets: every row, or the first --max-samples of each (as eval_tofu.py's)."""
        n = getattr(self.args, "max_samples", None)
        return {k: (qa[:n], pert[:n], base) for k, (qa, pert, base) in self.split(split)["sets"].items()}

    def table1_row(self, method: str, split: str, params: dict, fq_ref, theta_u: dict = None) -> dict:
        """The full evaluation (ES, MU, FQ) of the unmixed model theta_u (method None: the original)."""
        self.split(split)
        self.mix(theta_u if method is not None else None, 1.0)
        res = eval_tofu.evaluate(self.model, self.tokenizer, self.table1_sets(split), self.template,
                                 self.args.batch_size, getattr(self.args, "max_new_tokens", GEN_TOKENS), progress=False,
                                 with_eos=self.args.es_eos)
        m = res["metrics"]
        fq = None if fq_ref is None else eval_tofu.forget_quality(res["per_sample"]["forget"]["truth_ratio"], fq_ref)
        log_fq, bound = (None, None) if fq is None else eval_tofu.log10_fq(fq)  # p = 0: null and "< -300"
        return dict(method=method, split=split, params=params, es_exact_retain=m["retain"]["es_exact"],
                    es_exact_unlearn=m["forget"]["es_exact"], es_perturb_retain=m["retain"]["es_perturb"],
                    es_perturb_unlearn=m["forget"]["es_perturb"], model_utility=res["model_utility"],
                    log10_forget_quality=log_fq, log10_forget_quality_bound=bound)


    # ------------------------------------------------------------------------- the attacks (--attacks)

    def attack_sets(self, split: str) -> dict:
        """attack.py's sets for `split`: the forget rows (with their paraphrases), T and V cut by author with the
        sweep's --seed (one cut for every method, so that one control serves them all), the held-out retain rows
        and the holdout rows (the first --max-samples of those two), and the rows Table 1's PrivLeak compares."""
        s = self.split(split)
        if "attack" not in s:
            import fictitious
            a, n = self.args, getattr(self.args, "max_samples", None)
            forget = common.load_tofu(f"{split}_perturbed", self.data)
            author_rows = len(fictitious.QA) if self.data == "builtin" else 20
            on = a.relearn_on if len(forget) // author_rows >= 2 else "same-authors"  # one author: halves of it
            attack.check_split(len(forget), author_rows, on, split)
            T, V = attack.author_split(len(forget), author_rows, a.seed, on)
            p = common.PRESETS.get(self.preset, common.OTHER)
            if self.data != "builtin" and "other_data" in p:
                p = {**p, **p["other_data"]}
            s["attack"] = dict(sets=dict(forget=forget, retain=s["data"]["retain_eval"][:n], v=[forget[i] for i in V],
                                         holdout=eval_tofu.holdout_rows(split, self.data, n)),
                               t_rows=[s["data"]["forget"][i] for i in T], on=on, t=T, v=V,
                               lr=p["finetune_lr"], batch_size=min(p["finetune_batch"], len(T)),
                               leak_rows=self.table1_sets(split)["forget"][0], leak_holdout=eval_tofu.holdout_rows(
                                   split, self.data, n))
        return s["attack"]

    def min_k_auc(self, model, tokenizer, split: str) -> float:
        """The Min-K% AUC of Table 1's forget rows against the holdout rows (PrivLeak's s or r)."""
        at = self.attack_sets(split)
        enc = lambda rows: common.encode_rows(tokenizer, self.template, rows)
        f = eval_tofu.score(model, tokenizer, enc(at["leak_rows"]), self.args.batch_size, mia_k=MIA_K)[2]["min_k"]
        h = eval_tofu.score(model, tokenizer, enc(at["leak_holdout"]), self.args.batch_size, mia_k=MIA_K)[2]["min_k"]
        return eval_tofu.auc(f, h, "Min-K%")

    def relearn(self, model, tokenizer, split: str) -> tuple:
        """attack.py's relearning of `model` in place on T, for each S of --relearn-steps: (V before, [after S])."""
        at, a = self.attack_sets(split), self.args
        measure = lambda m: attack.measure_v(m, tokenizer, at["sets"], self.template, a.batch_size, MIA_K)
        before = measure(model)
        trainable = [p.requires_grad for p in model.parameters()]
        with redirect_stdout(open(os.devnull, "w")):  # attack.relearn's line per S
            rows = attack.relearn(model, tokenizer, at["t_rows"], a.relearn_steps, at["lr"], at["batch_size"], a.seed,
                                  self.template, measure)
        for p, g in zip(model.parameters(), trainable):
            p.requires_grad_(g)
        return before, rows

    def attack_control(self, split: str, retain_path) -> dict:
        """What the attacks are read against, once per split: the retain-only model's Min-K% AUC (r of PrivLeak)
        and its relearning on T (the control of ES on V); None for each without a retain-only model."""
        at = self.attack_sets(split)
        out = dict(split=split, on=at["on"], t=at["t"], v=at["v"], lr=at["lr"], batch_size=at["batch_size"],
                   retain_model=retain_path, retain_min_k_auc=None, before_v=None, relearn=None)
        if retain_path is not None:
            model, tokenizer = common.load_model(retain_path, frozen=True), common.load_tokenizer(retain_path)
            out["retain_min_k_auc"] = self.min_k_auc(model, tokenizer, split)
            out["before_v"], out["relearn"] = self.relearn(model, tokenizer, split)
        return out

    def attack(self, method, split: str, params: dict, control: dict, theta_u: dict = None) -> dict:
        """The three attacks of attack.py on theta_u (method None: the original model), in memory: PrivLeak of
        Table 1's forget rows against the holdout rows, ES after 4-bit quantization, and relearning on T with ES
        on V after each S. The model is left relearnt (every later use resets it)."""
        t0 = time.time()
        self.mix(theta_u if method is not None else None, 1.0)
        self.model.eval()
        at, a = self.attack_sets(split), self.args
        auc = self.min_k_auc(self.model, self.tokenizer, split)
        with attack.quiet_int8():
            q = attack.quantize(self.model, 4)
            quant = attack.measure_forget(q, self.tokenizer, at["sets"], self.template, a.batch_size)
        del q
        before_v, relearnt = self.relearn(self.model, self.tokenizer, split)
        return dict(method=method, split=split, params=params, auc_min_k=auc,
                    privleak=eval_tofu.privleak(auc, control["retain_min_k_auc"]), quant4=quant, before_v=before_v,
                    relearn=relearnt, seconds=round(time.time() - t0, 2))


def rank(row: dict) -> tuple:
    """The pick's rule: the lowest unlearn ES-exact after UWC, then the lowest unlearn ES-perturb;
    exact ties (frequent on a small forget set) go to the higher retain ES-exact, then to the
    smaller hyper-parameters, so that the pick never depends on the order rows were made in."""
    return (row["es_exact_unlearn"], row["es_perturb_unlearn"], -row["es_exact_retain"],
            tuple(row["params"].values()))


# ----------------------------------------------------------------------------- Forget Quality's reference

def retain_path(sweep: Sweep, split: str):
    """The retain-only model's folder for `split`: --retain-model ({split} replaced by the split), else the tiny
    preset's own of the same data (built on first use), else None."""
    path = sweep.args.retain_model and sweep.args.retain_model.replace("{split}", split)
    if path is None and sweep.preset == "tiny":
        path = eval_tofu.tiny_retain_model(split, sweep.data)
    return None if path is None else common.model_path(path, sweep.data)


def fq_reference(sweep: Sweep, split: str):
    """The retain-only model's forget truth ratios for `split`, or None (FQ n/a): --retain-stats or
    --retain-model ({split} in either is replaced by the split), else the tiny preset's own."""
    a = sweep.args
    pert = sweep.table1_sets(split)["forget"][1]
    if a.retain_stats:
        q, r = eval_tofu.read_retain_stats(a.retain_stats.replace("{split}", split), split)
        if q[:len(pert)] != [p["question"] for p in pert]:
            raise common.UsageError(f"--retain-stats for {split} was computed on other forget rows")
        return r[:len(pert)]
    path = retain_path(sweep, split)
    if path is None:
        return None
    return eval_tofu.forget_truth_ratios(common.load_model(path, frozen=True), common.load_tokenizer(path),
                                         sweep.template, pert, a.batch_size)


# ----------------------------------------------------------------------------- tables and figures

COLS = ("es_exact_retain", "es_exact_unlearn", "es_perturb_retain", "es_perturb_unlearn")
HEAD = "| ES-exact retain ↑ | ES-exact unlearn ↓ | ES-perturb retain ↑ | ES-perturb unlearn ↓ |"


def fmt(v):
    return "n/a" if v is None else f"{v:.4f}"


def paper_table(method: str, fixed: dict, layers: dict):
    """The number of the paper's table that a tuning table corresponds to, or None."""
    if method in ("wga", "npo", "tnpo"):
        return dict(wga=2, npo=3, tnpo=4)[method]
    if method == "wtnpo" and fixed["alpha"] in (0.5, 1, 1.5):
        return {0.5: 5, 1: 6, 1.5: 7}[fixed["alpha"]]
    if method == "rmu" and fixed["layer"] in layers.values():
        return 8 + list(layers.values()).index(fixed["layer"])
    return None


def write_outputs(root: Path, sweep: Sweep, rows: list, picks: dict, table1: list, attacks: list = (),
                  controls: dict = None):
    """sweep.json, tables.md, table1.md/.json and the figures (figures.py, from sweep.json and table1.json), each
    written atomically. `attacks`: --attacks' rows (one per Table 1 row), `controls` their splits' controls."""
    import figures  # matplotlib, only when a sweep writes its outputs
    before = {sp: s["before"] for sp, s in sweep.splits.items()}
    tables = figures.tuning_tables(rows, sweep.layers)
    md = [f"# UWC tuning ({sweep.preset or sweep.path}, data {sweep.data}, KL, tol {sweep.tol:g})\n",
          "Values after UWC (the paper's Appendix G layout); λ* is the mixing weight UWC found.\n"]
    for title, param, method, fixed, by_split in tables:
        number = paper_table(method, fixed, sweep.layers)
        stem = figures.tuning_name(method, fixed)
        md += [f"## {title}" + (f" (the paper's Table {number})" if number else "") + "\n",
               f"![{title}]({stem}.png)\n", f"| setup | {param} {HEAD} λ* |", "| --- " * 7 + "|"]
        for sp, rs in by_split.items():
            b = before.get(sp)
            if b:
                md.append(f"| {sp} | before unlearning | " + " | ".join(fmt(b[c]) for c in COLS) + " | |")
            md += [f"| {sp} | {r['params'][param]:g} | " + " | ".join(fmt(r[c]) for c in COLS) + f" | {r['lam']:.2f} |"
                   for r in rs]
        md.append("")
    md += ["## The picks\n", "The lowest unlearn ES-exact after UWC (ties: ES-perturb, then retain ES-exact), "
           "against the paper's stated default (Section 5) and its value in the grid, where the grid has it.\n",
           "| split | method | pick | ES-exact unlearn | paper's default | ES-exact unlearn | same |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for (m, sp), p in sorted(picks.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
        show = lambda d: ", ".join(f"{k} {v:g}" for k, v in d.items()) or "—"
        at_default = p["paper_default_es_exact_unlearn"]
        md.append(f"| {sp} | {NAMES[m]} | {show(p['params'])} | {p['es_exact_unlearn']:.4f} | "
                  f"{show(p['paper_default'])} | {'not in the grid' if at_default is None else f'{at_default:.4f}'} | "
                  f"{'yes' if p['params'] == p['paper_default'] else 'no'} |")
    atomic_text(root / "tables.md", "\n".join(md) + "\n")
    eval_tofu.write_json(str(root / "sweep.json"), dict(
        settings=settings(sweep), rmu_layers=sweep.layers, before=before, rows=rows,
        best={f"{m}/{sp}": p for (m, sp), p in picks.items()}))
    if tables:
        figures.tuning(root)  # one per tuning table, drawn from the sweep.json just written
    if table1:
        n, g = getattr(sweep.args, "max_samples", None), getattr(sweep.args, "max_new_tokens", GEN_TOKENS)
        cells = table1_cells(table1, attacks)
        seeds = sorted({r["seed"] for r in table1 if r["method"] is not None})
        attacked = any("attacks" in c for c in cells)
        t = ["| setup | method | params " + HEAD + " MU ↑ | log10 FQ ↑ |"
             + (" ES-exact V relearnt ↓ | ES-exact 4-bit ↓ | PrivLeak → 0 |" if attacked else ""),
             "| --- " * (12 if attacked else 9) + "|"]
        uwc_t = ["| setup | method | params " + HEAD + " λ* |", "| --- " * 8 + "|"]
        for c in cells:
            p = ", ".join(f"{k} {v:g}" for k, v in c["params"].items())
            name = "before unlearning" if c["method"] is None else NAMES[c["method"]]
            show = lambda k, where="unmixed": fmt_cell(c[where][k])
            t.append(f"| {c['split']} | {name} | {p} | " + " | ".join(show(k) for k in COLS)
                     + f" | {show('model_utility')} | {show('log10_forget_quality')} |"
                     + ("" if not attacked else " " + " | ".join(
                         show(k, "attacks") if "attacks" in c else "n/a" for k in ATTACK_COLS) + " |"))
            after = "unmixed" if c["method"] is None else "uwc"  # before unlearning: no mixing
            uwc_t.append(f"| {c['split']} | {name} | {p} | " + " | ".join(show(k, after) for k in COLS)
                         + f" | {'' if c['method'] is None else show('lam', 'uwc')} |")
        how = (f"the mean over the unlearning seeds {', '.join(map(str, seeds))}, with "
               + ("their range [min, max]" if len(seeds) < SD_FROM else "their sd") if len(seeds) > 1 else
               f"one unlearning seed ({seeds[0]})" if seeds else "")
        text = ["# Table 1 as the paper builds it: each method at its pick, unmixed, with KL\n",
                f"Each cell: {how}; the model before unlearning has no seed.\n" if how else "",
                f"Evaluated on the first {n} rows of each set only (--max-samples {n}).\n" if n else "",
                f"ROUGE-L on generations of at most {g} new tokens (--max-new-tokens {g}).\n" if g != GEN_TOKENS else "",
                attack_note(attacks, controls or {}) if attacked else ""] + t + [
            "\n# The same picks after UWC (this project's comparison at equal retention, not the paper's Table 1)\n"
        ] + uwc_t
        atomic_text(root / "table1.md", "\n".join(text) + "\n")
        eval_tofu.write_json(str(root / "table1.json"), dict(settings=settings(sweep), max_samples=n, max_new_tokens=g,
                                                             seeds=seeds, cells=cells, rows=table1, attacks=list(attacks),
                                                             attack_controls=controls if attacked else {}))
        if attacked:
            figures.table1_relearn(root / "table1.json", root / "table1-relearn.png")


# ----------------------------------------------------------------------------- seeds: means and spreads

SD_FROM = 5  # a cell shows its sd from this many seeds on, its range (min-max) below
T1_COLS = COLS + ("model_utility", "log10_forget_quality")


def stats(values: list, below: int = 0) -> dict:
    """Mean, sample sd, min and max of one cell's per-seed values (n: how many). `below`: the seeds whose
    log10 FQ is below -300 (a p-value of 0), given as None; a None leaves the cell without a mean."""
    xs = [v for v in values if v is not None]
    out = dict(n=len(values), values=values, mean=None, sd=None, min=None, max=None, below=below)
    if xs and len(xs) == len(values):
        mean = math.fsum(xs) / len(xs)
        sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
        out.update(mean=mean, sd=sd, min=min(xs), max=max(xs))
    return out


def fmt_cell(st: dict) -> str:
    """A cell of Table 1: the value (one seed), or the mean with its range [min, max] (fewer than SD_FROM
    seeds) or its sd."""
    if st["below"]:
        return "< -300" if st["below"] == st["n"] else f"< -300 in {st['below']} of {st['n']} seeds"
    if st["n"] == 1 or st["mean"] is None:
        return fmt(st["mean"])
    if st["n"] < SD_FROM:
        return f"{st['mean']:.4f} [{st['min']:.4f}, {st['max']:.4f}]"
    return f"{st['mean']:.4f} ± {st['sd']:.4f}"


ATTACK_COLS = ("relearn_es_exact_v", "quant4_es_exact_unlearn", "privleak")


def attack_values(r: dict) -> dict:
    """An attack row's three Table 1 columns: ES-exact on V after the largest S, ES-exact on the forget rows after
    4-bit quantization, PrivLeak; and ES-exact on V at S = 0 and after each S (the curve of the figure)."""
    return dict(relearn_es_exact_v=r["relearn"][-1]["es_exact_v"], quant4_es_exact_unlearn=r["quant4"]["es_exact_unlearn"],
                privleak=r["privleak"], es_exact_v=[r["before_v"]["es_exact_v"]] + [x["es_exact_v"] for x in r["relearn"]])


def attack_note(attacks: list, controls: dict) -> str:
    """The line above Table 1 that says what its three attack columns are, with each split's control."""
    steps = [x["steps"] for x in attacks[0]["relearn"]]
    ctl = "; ".join(f"{sp}: {c['on']}, " + (f"the retain-only model {c['before_v']['es_exact_v']:.4f} before relearning, "
                                              f"{c['relearn'][-1]['es_exact_v']:.4f} after" if c["relearn"] else "no control")
                    for sp, c in controls.items())
    return ("Attacks (attack.py's, on each seed's unmixed model; docs/robustness.md): ES-exact on V after "
            f"relearning on T for S = {steps[-1]} steps; ES-exact on the forget rows with the linear layers in 4 bits "
            "(bitsandbytes); PrivLeak in % (MUSE's, Min-K% against the retain-only model; 0: as that model, "
            f"negative: the forget rows still told apart). Relearning by split ({ctl}).\n")


def table1_cells(table1: list, attacks: list = ()) -> list:
    """One cell per (split, method) of Table 1's per-seed rows: the stats of every column, unmixed and
    (for a method) after UWC, in the rows' order; with `attacks` (their rows), the attack columns' stats of the
    seeds that have them (cell["attacks"]) and the mean ES on V per S (cell["attacks"]["es_exact_v_mean"])."""
    groups = {}
    for r in table1:
        groups.setdefault((r["split"], r["method"]), []).append(r)
    cells = []
    for (split, method), rs in groups.items():
        unmixed = {k: stats([r[k] for r in rs]) for k in T1_COLS}
        unmixed["log10_forget_quality"]["below"] = sum(bool(r["log10_forget_quality_bound"]) for r in rs)
        cell = dict(split=split, method=method, params=rs[0]["params"], seeds=[r.get("seed") for r in rs],
                    unmixed=unmixed)
        if method is not None:
            cell["uwc"] = {k: stats([r["uwc"][k] for r in rs]) for k in ("lam",) + COLS}
        att = [attack_values(a) for a in attacks if (a["split"], a["method"]) == (split, method)]
        if att:
            cell["attacks"] = {k: stats([a[k] for a in att]) for k in ATTACK_COLS}
            cell["attacks"]["es_exact_v_mean"] = [math.fsum(v) / len(v) for v in zip(*(a["es_exact_v"] for a in att))]
        cells.append(cell)
    return cells


def beyond_noise(xs: list, ys: list) -> int:
    """The rule every comparison of methods here follows: a difference counts only when the per-seed
    values of the two do not overlap at all (every x above every y: 1; every x below every y: -1);
    otherwise 0, within the noise. Were the two methods alike, all 3 seeds of one above all 3 of the
    other would happen by chance with probability 2/20 = 0.1 (5 seeds each: 2/252, 0.008)."""
    if None in xs or None in ys:
        return 0
    return 1 if min(xs) > max(ys) else -1 if max(xs) < min(ys) else 0


def write_profile(path: Path, clock: Counter, wall: float, ran: Counter):
    """profile.json: this process's wall time, its seconds by phase (the rest: writing rows, claims, the
    tables) and the units it ran; printed as one line too."""
    phases = {k: round(v, 1) for k, v in sorted(clock.items(), key=lambda kv: -kv[1])}
    atomic_text(path, json.dumps(dict(wall_seconds=round(wall, 1), phases=phases,
                                      other=round(wall - sum(clock.values()), 1), units=dict(ran)), indent=1) + "\n")
    print(f"{wall / 60:.1f} min: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in phases.items()) + f" ({path.name})")


def atomic_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def settings(sweep: Sweep) -> dict:
    """What a row's numbers depend on besides its method, split and params: a resumed sweep must match."""
    a = sweep.args
    lora = {} if not getattr(a, "lora_r", 0) else dict(lora_r=a.lora_r, lora_alpha=a.lora_alpha)  # full: as before
    return dict(model=a.model, path=sweep.path, data=sweep.data, template=sweep.template, tol=sweep.tol,
                es_eos=a.es_eos, seed=a.seed, lr=a.lr, epochs=a.epochs, batch_size=a.batch_size, reg="kl", **lora)


def row_on_disk(f: Path, want: dict):
    """The row in file f (its settings removed) when they are `want`, else None."""
    try:
        r = json.loads(f.read_text())
    except FileNotFoundError:
        return None
    return r if r.pop("settings", None) == want else None


def load_rows(root: Path, want: dict) -> list:
    """Every finished configuration's row under root/runs whose settings are `want`."""
    return [r for r in (row_on_disk(f, want) for f in sorted((root / "runs").glob("*/row.json"))) if r is not None]


# ----------------------------------------------------------------------------- shards: claims on a shared folder

class Claims:
    """Who runs which unit of work (a configuration, or a Table 1 row), among processes that share the sweep's
    folder: on one machine, across GPUs, SLURM array tasks or nodes. A claim is a file made with O_EXCL (atomic,
    on NFS too), holding host, pid and time; its owner touches it every `timeout` / 20 s while it works and deletes
    it when the unit's row is written. A claim is stale, and retaken, when it is older than `timeout` (an owner on
    another host that died) or when its process is gone on this host. A retake is itself guarded by an O_EXCL
    file, so that two processes never both retake one claim."""

    def __init__(self, folder: Path, timeout: float):
        import socket
        import threading
        self.folder, self.timeout, self.host, self.pid = folder, timeout, socket.gethostname(), os.getpid()
        folder.mkdir(exist_ok=True)
        self.held = set()
        self.lock = threading.Lock()
        stop = threading.Event()
        self.stop = stop

        def beat():  # the owner's heartbeat: a claim in use never looks stale to another host
            while not stop.wait(max(1.0, timeout / 20)):
                with self.lock:
                    for f in list(self.held):
                        with suppress(OSError):
                            os.utime(f)
        threading.Thread(target=beat, daemon=True).start()

    def path(self, unit: str) -> Path:
        return self.folder / f"{unit}.claim"

    def _create(self, f: Path) -> bool:
        try:
            fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as out:
            json.dump(dict(host=self.host, pid=self.pid, time=time.time()), out)
        with self.lock:
            self.held.add(f)
        return True

    def stale(self, f: Path) -> bool:
        try:
            age = time.time() - f.stat().st_mtime
        except OSError:  # gone
            return False
        if age > self.timeout:
            return True
        try:
            owner = json.loads(f.read_text())
        except OSError:
            return False
        except ValueError:  # being written (a few microseconds), or left empty by a process killed then
            return age > 10
        if owner.get("host") != self.host or owner.get("pid") == self.pid:
            return False
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return False

    def take(self, unit: str) -> bool:
        """True when this process now holds `unit`'s claim: a new one, or a stale one retaken."""
        f = self.path(unit)
        if self._create(f):
            return True
        guard = f.with_name(f.name + ".retake")
        if not self.stale(f):
            return False
        with suppress(OSError):  # a guard left by a process that died while retaking
            if time.time() - guard.stat().st_mtime > max(60.0, self.timeout):
                guard.unlink()
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False  # another process is retaking it
        os.close(fd)
        try:
            if not self.stale(f):  # retaken meanwhile, or released
                return self._create(f)
            f.unlink()
            return self._create(f)
        finally:
            guard.unlink()

    def release(self, unit: str):
        f = self.path(unit)
        with self.lock:
            self.held.discard(f)
        with suppress(FileNotFoundError):
            f.unlink()

    def clear_stale(self):
        """Remove the stale claims left in the folder (a process killed after its row was written, before it
        released the claim); called once every unit is done."""
        for f in self.folder.glob("*.claim"):
            if self.stale(f):
                with suppress(FileNotFoundError):
                    f.unlink()

    def release_all(self):
        with self.lock:
            held, self.held = list(self.held), set()
        for f in held:
            with suppress(FileNotFoundError):
                f.unlink()


def parse_shard(text: str) -> tuple:
    """'i/N' -> (i, N), 0 <= i < N; raises UsageError."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not (n >= 1 and 0 <= i < n):
        raise common.UsageError(f"--shard takes i/N with 0 <= i < N, e.g. 0/4; got '{text}'")
    return i, n


# ----------------------------------------------------------------------------- the command

def parse_layers(text: str) -> tuple:
    out = []
    for x in (x.strip() for x in text.split(",") if x.strip()):
        if x not in ("shallow", "middle", "deep") and not x.isdigit():
            raise common.UsageError(f"--rmu-layers takes hidden-state numbers or shallow, middle, deep; got '{x}'")
        out.append(x if not x.isdigit() else int(x))
    return tuple(out)


def parse_list(text: str, cast=float) -> tuple:
    try:
        return tuple(cast(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise common.UsageError(f"cannot read the list '{text}': give comma-separated numbers")


def main(argv=None):
    parser = common.make_parser(__doc__)
    a = parser.add_argument
    a("--model", default="tiny", help=f"preset ({', '.join(common.PRESETS)}), hub id or local model folder")
    a("--data", default=None, help="'builtin', a hub id or a folder of <config>.json files (default: the preset's)")
    a("--method", default="wga", help=f"one of {', '.join(METHODS)}, or all")
    a("--split", default="forget05", help="forget01, forget05, forget10, or all")
    a("--grid", default=None, help="comma-separated values replacing the swept hyper-parameter's grid "
                                   "(WGA alpha, NPO/TNPO/WTNPO/SimNPO/IdkDPO/UNDIAL beta, SatImp beta1, RMU c)")
    a("--wtnpo-alpha", default=None, help="WTNPO's alpha values (default: 0.5,1,1.5, Tables 5-7)")
    a("--rmu-layers", default=None, help="RMU's hidden states (default: shallow, middle and deep, printed)")
    a("--tol", type=float, default=None, help="UWC's allowed drop of retain ES-exact (default: the preset's)")
    a("--lr", type=float, default=None, help="unlearning learning rate (default: the preset's)")
    a("--epochs", type=float, default=None, help="unlearning epochs (default: the preset's, 5)")
    a("--seed", type=int, default=0, help="random seed of every configuration of the grid")
    a("--seeds", type=int, default=3, help="Table 1: each pick is run with the unlearning seeds --seed, --seed + 1, "
                                           "... (this many): each cell is their mean, with their spread")
    a("--batch-size", type=int, default=64, help="rows per forward pass of the evaluation")
    a("--retain-model", default=None, help="retain-only model for Forget Quality ({split} is replaced by the "
                                           "split; default for tiny on the built-in set: out/tiny/retainXX)")
    a("--retain-stats", default=None, help="the retain-only model's eval.json instead ({split} replaced too)")
    a("--es-eos", action="store_true", help="ES counts the EOS token (the stricter reading; see eval_tofu.py)")
    a("--no-table1", action="store_true", help="tuning tables only: skip Table 1's full evaluations")
    a("--max-samples", type=int, default=None, help="Table 1 on the first N rows of each set only, as eval_tofu.py's "
                                                     "(default: all; the tuning always uses all)")
    a("--max-new-tokens", type=int, default=GEN_TOKENS, help="Table 1's generation cap for ROUGE-L, as eval_tofu.py's "
                                                            f"(default {GEN_TOKENS}, TOFU's)")
    a("--attacks", action="store_true", help="Table 1 gains attack.py's attacks on every pick and seed: ES-exact on V "
                                              "after relearning (the largest S), ES-exact after 4-bit quantization, "
                                              "PrivLeak; and the figure table1-relearn.png")
    a("--relearn-steps", default="2,5,10,20", help="with --attacks: relearning steps S, increasing (as attack.py)")
    a("--relearn-on", choices=attack.RELEARN_ON, default="other-authors",
      help="with --attacks: T and V by author (a split of one author: same-authors), as attack.py")
    a("--keep", action="store_true", help="keep every unlearned model (runs/<name>/, before UWC)")
    a("--lora-r", type=int, default=0, help="tune LoRA adapters of this rank (the method scripts' --lora-r, at the "
                                            "preset's LoRA learning rate), UWC scaling the adapter (default 0: full)")
    a("--lora-alpha", type=float, default=32, help="with --lora-r: the adapters' scale alpha/r (as the scripts')")
    a("--shard", default="0/1", help="i/N: this process is shard i of N sharing --out (GPUs, SLURM array tasks, nodes); "
                                     "each unit of work is claimed before it runs (docs/tuning.md)")
    a("--claim-timeout", type=float, default=600, help="seconds after which another host's claim that was not renewed "
                                                       "is taken as its process dead (a claim is renewed while it runs)")
    a("--tables", action="store_true", help="run nothing: make the tables, Table 1 and the figures from every row on disk")
    a("--out", default=None, help="output folder: new, empty, or a sweep's to resume (default: out/sweep/<preset>)")
    common.add_min_forget_es(parser)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    try:
        common.single_process("sweep.py")
        methods = METHODS if args.method == "all" else (args.method,)
        if args.method != "all" and args.method not in METHODS:
            raise common.UsageError(f"unknown method '{args.method}' (choose from {', '.join(METHODS)}, all)")
        splits = common.SPLITS if args.split == "all" else (args.split,)
        if args.split != "all" and args.split not in common.SPLITS:
            raise common.UsageError(f"unknown split '{args.split}' (choose from {', '.join(common.SPLITS)}, all)")
        if args.retain_model and args.retain_stats:
            raise common.UsageError("give --retain-model or --retain-stats, not both")
        if args.tol is not None and not 0 <= args.tol < 1:
            raise common.UsageError(f"--tol must be in [0, 1), got {args.tol}")
        if args.seeds < 1:
            raise common.UsageError(f"--seeds must be >= 1, got {args.seeds}")
        if args.max_samples is not None and args.max_samples < 1:
            raise common.UsageError(f"--max-samples must be >= 1, got {args.max_samples}")
        if args.max_new_tokens < 1:
            raise common.UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.batch_size < 1 or (args.lr is not None and not args.lr > 0) or (
                args.epochs is not None and not args.epochs > 0):
            raise common.UsageError("--batch-size must be >= 1 and --lr, --epochs positive")
        args.shard = parse_shard(args.shard)
        if not args.claim_timeout > 0:
            raise common.UsageError(f"--claim-timeout must be positive, got {args.claim_timeout:g}")
        args.relearn_steps = attack.int_list(args.relearn_steps, "--relearn-steps")
        if args.attacks and (args.no_table1 or not args.relearn_steps):
            raise common.UsageError("--attacks adds columns to Table 1: it needs Table 1 (no --no-table1) and "
                                    "--relearn-steps")
        if args.attacks:
            attack.need_bitsandbytes()
        if args.lora_r < 0 or args.lora_alpha <= 0:
            raise common.UsageError(f"--lora-r must be >= 0 and --lora-alpha > 0, got {args.lora_r} and "
                                    f"{args.lora_alpha:g}")
        if args.lora_r and args.attacks:
            raise common.UsageError("--attacks is for full fine-tuning sweeps: with --lora-r, keep the picks (--keep) "
                                    "and run attack.py on their folders, which hold the merged models")
        args.grid = args.grid and parse_list(args.grid)
        args.wtnpo_alpha = args.wtnpo_alpha and parse_list(args.wtnpo_alpha)
        args.rmu_layers = args.rmu_layers and parse_layers(args.rmu_layers)
        if args.model not in common.PRESETS and common.missing_folder(args.model):
            raise common.UsageError(f"model folder '{args.model}' does not exist")
        for sp in splits:  # the data must be there before anything is trained
            common.split_data(sp, args.data or eval_tofu.model_defaults(args.model, args.model)[1])
        sweep = Sweep(args)
        preset = common.PRESETS.get(sweep.preset, common.OTHER)
        configs = [(m, sp, p) for sp in splits for m in methods for p in grid(m, args, sweep.layers)]
        for m, sp, p in configs:
            check_params(m, p, sweep.n_layers)
        if len(splits) > 1 and "{split}" not in (args.retain_model or args.retain_stats or "{split}"):
            raise common.UsageError("with --split all, put {split} in --retain-model / --retain-stats: one "
                                    "retain-only model per split")
        for sp in splits if args.retain_stats else ():
            eval_tofu.read_retain_stats(args.retain_stats.replace("{split}", sp), sp)
        for sp in splits if args.retain_model else ():
            m = args.retain_model.replace("{split}", sp)
            if m not in common.PRESETS and common.missing_folder(m):
                raise common.UsageError(f"--retain-model folder '{m}' does not exist")
    except common.UsageError as e:
        common.die(str(e))
    own = sweep.data == common.data_source(preset["data"])
    name = (sweep.preset or Path(sweep.path).name) + ("" if own else f"-{common.source_slug(sweep.data)}") + (
        f"-lora{args.lora_r}" if args.lora_r else "")
    root = Path(args.out or common.OUT / "sweep" / name)
    if (common.read_marker(root) or {}).get("script") != "sweep.py":  # a sweep's own folder is resumed, else a new one
        if root.exists() and (not root.is_dir() or any(not f.name.startswith(common.MARKER) for f in root.iterdir())):
            common.die(f"--out {root} exists and is not a sweep's folder: nothing was touched; give a new or empty "
                       f"folder, or a sweep's folder to resume it")
        root.mkdir(parents=True, exist_ok=True)
        common.write_marker(root, dict(script="sweep.py"))
    sweep.runs = root / "runs"
    sweep.runs.mkdir(exist_ok=True)
    want = settings(sweep)
    print(f"sweep {sweep.path} | data {sweep.data} | KL | UWC tol {sweep.tol:g} | RMU hidden states "
          + ", ".join(f"{k} {v}" for k, v in sweep.layers.items()) + f" of 0..{sweep.n_layers} | -> {root}", flush=True)

    try:  # each split's ES before unlearning, first: a target model that does not know it is said at once
        for sp in splits:
            sweep.split(sp)
    except common.NonFinite as e:
        common.say_error(f"{sp}, before unlearning: {e}")
        sys.exit(1)  # as common.cli: the flags were fine, a number was not

    # Units of work in one process's order: split by split, method by method, the grid (a configuration on disk
    # with these settings is done), then Table 1's rows of the pick, one per seed, once its grid is complete.
    # Shard i of N goes first through the units i, i + N, ..., then through all; a unit runs only under its claim.
    t1_dir = root / "table1"
    t1_dir.mkdir(exist_ok=True)
    seeds = [args.seed + k for k in range(args.seeds)]  # Table 1's unlearning seeds; the grid's is the first
    want_t1 = dict(want)  # Table 1's rows: the grid's settings, and its own flags where they are not the defaults
    if args.max_samples is not None:
        want_t1["max_samples"] = args.max_samples
    if args.max_new_tokens != GEN_TOKENS:
        want_t1["max_new_tokens"] = args.max_new_tokens
    seeds_of = lambda m: [None] if m is None else seeds  # the model before unlearning has no seed
    t1_file = lambda m, sp, seed: t1_dir / (f"{sp}-before.json" if m is None else f"{sp}-{m}-seed{seed}.json")

    def t1_row(m, sp, seed=None):
        """Table 1's row on disk for these settings (and this seed), or None."""
        return row_on_disk(t1_file(m, sp, seed), want_t1)

    want_att = dict(want_t1, attacks=dict(relearn_steps=args.relearn_steps, relearn_on=args.relearn_on, quant_bits=4,
                                          mia_k=MIA_K))  # an attack row's settings
    att_file = lambda m, sp, seed: t1_file(m, sp, seed).with_name(t1_file(m, sp, seed).stem + "-attacks.json")
    control_file = lambda sp: t1_dir / f"{sp}-control-attacks.json"

    def att_row(m, sp, seed=None, file=None):
        """An attack row (or a split's control, `file`) on disk for these settings, or None."""
        return row_on_disk(file or att_file(m, sp, seed), want_att)

    def grid_rows(m, sp):
        """The rows on disk of (m, sp)'s configurations, every shard's; None while one is missing."""
        out = []
        for _, _, p in (c for c in configs if c[:2] == (m, sp)):
            r = row_on_disk(sweep.runs / name_of(m, sp, p) / "row.json", want)
            if r is None:
                return None
            out.append(r)
        return out

    def pick(m, sp):
        """(the pick's grid row, its params) of a complete grid, or (None, None); the model before: (None, {})."""
        if m is None:
            return None, {}
        rs = grid_rows(m, sp)
        best = min(rs, key=rank) if rs else None
        return best, best and best["params"]

    def t1_needs(m, sp, seed, params):
        """(Table 1's row, its attack row) still to make for this pick and seed."""
        old, old_att = t1_row(m, sp, seed), args.attacks and att_row(m, sp, seed)
        return (not args.no_table1 and (old is None or old["params"] != params),
                bool(args.attacks) and (old_att is None or old_att["params"] != params))

    units = [("grid", m, sp, p) for sp in splits for m in (None,) + methods for p in
             ([] if m is None else [c[2] for c in configs if c[:2] == (m, sp)])]
    units = [u for sp in splits for m in (None,) + methods for u in
             [x for x in units if x[1:3] == (m, sp)] + [("table1", m, sp, seed) for seed in seeds_of(m)]]
    unit_name = lambda u: name_of(u[1], u[2], u[3]) if u[0] == "grid" else \
        f"table1-{u[2]}-{'before' if u[1] is None else f'{u[1]}-seed{u[3]}'}"

    def done(u) -> bool:
        if u[0] == "grid":  # this process's, or another shard's since it started
            if unit_name(u) not in finished and row_on_disk(sweep.runs / unit_name(u) / "row.json", want):
                finished.add(unit_name(u))
            return unit_name(u) in finished
        params = pick(u[1], u[2])[1]
        return params is not None and not any(t1_needs(u[1], u[2], u[3], params))

    finished = {name_of(r["method"], r["split"], r["params"]) for r in load_rows(root, want)}
    i, n_shards = args.shard
    claims = Claims(root / "claims", args.claim_timeout)
    todo = [u for u in units if not done(u)] if not args.tables else []
    n_grid = sum(u[0] == "grid" for u in todo)
    from tqdm import tqdm
    print(f"{len(configs)} configurations, {len(configs) - n_grid} already done; {len(todo) - n_grid} Table 1 rows to "
          f"make (unlearning seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))})"
          + (f"; shard {i}/{n_shards}" if n_shards > 1 else "") + (" | --tables: nothing runs" if args.tables else ""),
          flush=True)
    bar = tqdm(total=len(todo), desc="sweep" if n_shards == 1 else f"shard {i}/{n_shards}", unit="run",
               dynamic_ncols=True)
    current, held, refs, controls = None, None, {}, {}

    def run(u):
        """Run one unit under its claim; the row is written atomically before the claim goes."""
        nonlocal current
        kind, m, sp, x = u
        if kind == "grid":
            current = sweep.runs / name_of(m, sp, x)
            bar.set_postfix_str(current.name)
            for key in [k for k in sweep.kept if k != (m, sp)]:  # one pick's weights in memory at most
                sweep.kept.pop(key)
            row = sweep.config(m, sp, x)
            current.mkdir(parents=True, exist_ok=True)  # with --no-save it may hold only the logs
            eval_tofu.write_json(str(current / "row.json"), dict(row, settings=want))
            finished.add(current.name)
            bar.write(f"{current.name}: λ* {row['lam']:.2f} | ES-exact unlearn {row['es_exact_unlearn']:.4f}"
                      f" | retain {row['es_exact_retain']:.4f} | {row['seconds']:.0f} s")
            current = None
            return
        seed = x
        grid_row, params = pick(m, sp)
        need_t1, need_att = t1_needs(m, sp, seed, params)
        bar.set_postfix_str(f"table 1: {sp} {NAMES.get(m, 'before unlearning')}" + ("" if m is None else f" seed {seed}"))
        if sp not in refs:
            with sweep.timed("Table 1: the retain-only model's truth ratios (FQ)"):
                refs[sp] = fq_reference(sweep, sp)
        theta_u = None
        if m is not None:
            current = None if seed == args.seed else sweep.runs / f"{name_of(m, sp, params)}-seed{seed}"
            with sweep.timed("Table 1: unlearning the picks again"):
                theta_u = sweep.pick_weights(m, sp, params, seed)
            current = None
        if need_t1 and m is None:
            with sweep.timed("Table 1: full evaluation (ES, MU, FQ)"):
                r = sweep.table1_row(None, sp, params, refs[sp])
        elif need_t1:
            # after UWC: the grid's row at the grid's seed, else UWC's search on this seed's weights
            u_row = grid_row if seed == args.seed else sweep.after_uwc(sweep.split(sp), theta_u)
            with sweep.timed("Table 1: full evaluation (ES, MU, FQ)"):
                r = dict(sweep.table1_row(m, sp, params, refs[sp], theta_u), seed=seed,
                         uwc={k: u_row[k] for k in ("lam",) + COLS})
        if need_t1:
            eval_tofu.write_json(str(t1_file(m, sp, seed)), dict(r, settings=want_t1))
        if need_att:
            if sp not in controls:  # the retain-only model's PrivLeak level and relearning, once a split
                controls[sp] = att_row(None, sp, file=control_file(sp))
                if controls[sp] is None:
                    with sweep.timed("attacks"):
                        controls[sp] = sweep.attack_control(sp, retain_path(sweep, sp))
                    eval_tofu.write_json(str(control_file(sp)), dict(controls[sp], settings=want_att))
            with sweep.timed("attacks"):
                r = dict(sweep.attack(m, sp, params, controls[sp], theta_u), seed=seed)
            eval_tofu.write_json(str(att_file(m, sp, seed)), dict(r, settings=want_att))
        if m is not None and seed == seeds[-1]:
            sweep.kept.pop((m, sp), None)  # the pick's unmixed weights are not needed any more

    try:
        order = todo[i::n_shards] + todo  # this shard's own units first, then whatever is left
        ran = Counter()  # units this process ran, by kind
        progressed = True
        while progressed:  # again while a pass ran something: units of dead shards, rows the others finished
            progressed = False
            for u in order:
                if done(u) or (u[0] == "table1" and pick(u[1], u[2])[1] is None):
                    continue  # finished, or a Table 1 row whose grid another shard is still running
                if not claims.take(unit_name(u)):
                    continue  # another shard's
                held = unit_name(u)
                try:
                    if not done(u):  # finished by another shard between the check and the claim
                        run(u)
                        ran[u[0]] += 1
                        bar.update(1)
                        progressed = True
                finally:
                    claims.release(held)
                    held = None
            order = [u for u in order if not done(u)]
    except KeyboardInterrupt:
        bar.close()
        claims.release_all()
        if current is not None:  # the configuration in progress: its half-written run folder goes
            shutil.rmtree(current.with_name(current.name + ".tmp"), ignore_errors=True)
        print(f"sweep.py: interrupted: {len(finished)} finished configurations are in {root}; "
              f"run the same command again to go on", file=sys.stderr)
        sys.exit(130)
    except common.NonFinite as e:  # a NaN loss or metric: the rows done stay, the configuration in progress goes
        bar.close()
        claims.release_all()
        if current is not None:
            shutil.rmtree(current.with_name(current.name + ".tmp"), ignore_errors=True)
        common.say_error(f"{current.name}: {e}" if current is not None else str(e))
        sys.exit(1)  # as common.cli: the flags were fine, a number was not
    except common.UsageError as e:
        claims.release_all()
        common.die(str(e))
    bar.close()
    claims.stop.set()
    if ran and n_shards == 1:  # where this process's time went, by phase (docs/tuning.md, "Where the time goes")
        write_profile(root / "profile.json", sweep.clock, time.perf_counter() - t_start, ran)
    left = [] if args.tables else [u for u in units if not done(u)]
    if not left:
        claims.clear_stale()
    if left:  # with other shards still at work: the last one to finish writes the tables
        print(f"shard {i}/{n_shards}: nothing left to claim; {len(left)} units are with other shards or wait on them "
              f"(the last shard to finish writes the tables; `--tables` makes them from the rows on disk now)")
        return root
    all_rows = load_rows(root, want)
    picks = {}
    for (m, sp) in {(r["method"], r["split"]) for r in all_rows}:
        best = min([r for r in all_rows if r["method"] == m and r["split"] == sp], key=rank)
        default = paper_default(m, sp, preset)
        same = [r for r in all_rows if r["method"] == m and r["split"] == sp and r["params"] == default]
        picks[(m, sp)] = dict(params=best["params"], es_exact_unlearn=best["es_exact_unlearn"], lam=best["lam"],
                              paper_default=default, paper_default_es_exact_unlearn=same[0]["es_exact_unlearn"]
                              if same else None)
    for sp in {r["split"] for r in all_rows}:
        sweep.split(sp)  # the before-unlearning levels of every split on disk, for the tables
    t1_all = [r for r in (t1_row(m, sp, seed) for sp in common.SPLITS for m in (None,) + METHODS
                          for seed in seeds_of(m)) if r is not None and (
        r["method"] is None or picks.get((r["method"], r["split"]), {}).get("params") == r["params"])]
    order = lambda r: (common.SPLITS.index(r["split"]), -1 if r["method"] is None else METHODS.index(r["method"]),
                       r.get("seed", -1))
    by_grid = lambda r: (METHODS.index(r["method"]), common.SPLITS.index(r["split"]), tuple(r["params"].values()))
    att_all = [r for r in (att_row(m, sp, seed) for sp in common.SPLITS for m in (None,) + METHODS
                           for seed in seeds_of(m)) if r is not None and (
        r["method"] is None or picks.get((r["method"], r["split"]), {}).get("params") == r["params"])]
    att_controls = {sp: c for sp in common.SPLITS if (c := att_row(None, sp, file=control_file(sp))) is not None}
    write_outputs(root, sweep, sorted(all_rows, key=by_grid), picks,
                  sorted(t1_all, key=order), sorted(att_all, key=order) if args.attacks else [], att_controls)
    print((root / "table1.md").read_text() if (root / "table1.md").is_file() else "")
    print(f"wrote {root}/sweep.json, tables.md" + (", table1.md" if t1_all else ""))
    return root


if __name__ == "__main__":
    common.cli(main)
