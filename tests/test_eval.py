"""eval_tofu.py: one-pass ES against greedy generation, TOFU's metrics by hand, the command."""
import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import hmean, ks_2samp

import common
import eval_tofu
from conftest import run_script

QA = common.QA_TEMPLATE


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return common.load_model(tiny_path, frozen=True), common.load_tokenizer(tiny_path)


def noisy_copy(model, scale, seed=0):
    """The tiny model with its weights shaken: unsure, so greedy decoding meets near-ties."""
    import copy
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return m


# ----------------------------------------------------------------------------- ES against its definition

def es_by_generation(model, tokenizer, e, with_eos=False):
    """ES of one encoded row by its definition, with `generate`: the smallest k for which greedy
    decoding from [prompt, y_1..y_k] generates y_{k+1}..y_n, trying k = 0, 1, ... y ends before the
    EOS (decoding need not stop), or with it when with_eos (it must stop too). Each try stops at its
    first wrong token, which cannot change whether it reproduces."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnMismatch(StoppingCriteria):
        def __init__(self, want, start):
            self.want, self.start = want, start

        def __call__(self, input_ids, scores, **kwargs):
            t = input_ids.shape[1] - self.start
            return torch.tensor([input_ids[0, -1].item() != self.want[t - 1]], device=input_ids.device)

    n0 = e["labels"].count(-100)
    y = e["input_ids"][n0:]
    if not with_eos and y[-1] == tokenizer.eos_token_id:
        y = y[:-1]
    for k in range(len(y)):
        ids = torch.tensor([e["input_ids"][:n0 + k]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(y) - k,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             stopping_criteria=StoppingCriteriaList([StopOnMismatch(y[k:], ids.shape[1])]))
        if out[0, ids.shape[1]:].tolist() == y[k:]:  # an early EOS ends the output short: not reproduced
            return 1 - k / len(y)
    return 0.0 if y else 1.0  # even y_n is wrong: k* = n (an EOS-only answer has nothing to extract)


def es_cases(tokenizer):
    """60 QA pairs: true answers (ES near 1), paraphrased and perturbed answers (in between)."""
    forget = common.load_tofu("forget05_perturbed")
    retain = common.load_tofu("retain_perturbed")
    pairs = [(r["question"], r["answer"]) for r in forget[:20] + retain[:10]]
    pairs += [(r["question"], r["paraphrased_answer"]) for r in forget[20:35]]
    pairs += [(r["paraphrased_question"], r["perturbed_answer"][0]) for r in forget[35:45]]
    return [common.encode(tokenizer, QA, q, a) for q, a in pairs]


def test_es_one_pass_equals_greedy_generation(tiny):
    model, tok = tiny
    ex = es_cases(tok)
    fast = eval_tofu.score(model, tok, ex, batch_size=16)[1]
    slow = [es_by_generation(model, tok, e) for e in ex]
    assert fast == slow
    # an untrained model gets (nearly) every token wrong: ES = 0
    import finetune
    rand = finetune.tiny_model(tok, seed=1).eval()
    fast0 = eval_tofu.score(rand, tok, ex[:6], batch_size=4)[1]
    assert fast0 == [es_by_generation(rand, tok, e) for e in ex[:6]]
    allv = fast + fast0
    assert len(allv) >= 50 and 1.0 in allv and 0.0 in allv and any(0 < v < 1 for v in allv), allv


@pytest.fixture(scope="module")
def partly_unlearned(tiny):
    """The tiny model part-way through gradient ascent (ga.ga_loss, plain SGD) on 16 forget rows, taken
    where the first 12 held-out retain rows have at least 5 distinct ES values strictly between 0 and 1
    under both readings, and some still 1: some answers gone, many half-gone. GA moves the tiny model
    from 'all kept' to 'all gone' within a step or two, so each step is also tried part-way: the
    weights mixed between before and after it, (1 - t) theta_before + t theta_after for t = 0.1 .. 1.
    lr 1.5, 1, 0.5 and up to 12 steps are searched, in that order."""
    import copy
    import ga
    model, tok = tiny
    forget_batch = common.collate(common.encode_rows(tok, QA, common.split_data("forget05")["forget"][:16]),
                                  tok.pad_token_id)
    rows = common.encode_rows(tok, QA, common.split_data("forget05")["retain_eval"][:12])

    def wanted(m):
        for e in (0, 1):
            es = eval_tofu.score(m.eval(), tok, rows, with_eos=e)[1]
            mid = {v for v in es if 0 < v < 1}
            if len(mid) < 5 or max(mid) - min(mid) <= 0.3 or 1.0 not in es:
                return False
        return True

    mixed = copy.deepcopy(model)
    for lr in (1.5, 1.0, 0.5):
        m = copy.deepcopy(model).train()
        for p in m.parameters():
            p.requires_grad_(True)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        for _ in range(12):
            before = {k: v.detach().clone() for k, v in m.state_dict().items()}
            logp, mask = common.answer_logprobs(m, forget_batch)
            loss, _ = ga.ga_loss(logp, mask, mask.sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
            after = m.state_dict()
            with torch.no_grad():
                for t in [k / 10 for k in range(1, 11)]:
                    for k, v in mixed.state_dict().items():
                        v.copy_((1 - t) * before[k] + t * after[k])
                    if wanted(mixed):
                        return mixed.eval()
            m.train()
    return mixed.eval()  # none found: the test below fails and says so


@pytest.mark.parametrize("with_eos", [False, True])
def test_es_one_pass_equals_generation_after_unlearning(tiny, partly_unlearned, with_eos):
    """Row by row, one pass against `generate` from every prefix, on rows where ES is neither 0 nor 1
    (at least 5 of these 12, see partly_unlearned), as well as 0 and 1."""
    tok = tiny[1]
    ex = common.encode_rows(tok, QA, common.split_data("forget05")["retain_eval"][:12])
    fast = eval_tofu.score(partly_unlearned, tok, ex, batch_size=5, with_eos=with_eos)[1]
    assert fast == [es_by_generation(partly_unlearned, tok, e, with_eos) for e in ex]
    mid = [v for v in fast if 0 < v < 1]
    assert len(mid) >= 5 and len(set(mid)) >= 5 and max(mid) - min(mid) > 0.3 and 1.0 in fast, fast


def test_es_from_logits_by_hand():
    """The edges, by default (EOS left out: n = 5) and with --es-eos (EOS is y_6), in one padded batch."""
    V, T, EOS = 8, 9, 7
    labels = torch.full((9, T), -100)
    labels[:, 3:] = torch.tensor([1, 2, 3, 4, 5, EOS])  # a 3-token prompt, 5 answer tokens, EOS
    labels[5, 5:] = torch.tensor([EOS, -100, -100, -100])  # row 5: [1, 2, EOS], then right padding
    labels[6, 8] = 6                                    # row 6: the answer does not end with EOS
    labels[7, 3:8] = -100                               # row 7: EOS alone
    pred = labels[:, 1:].clamp(min=0).clone()           # the argmax at each position; answer token j at j + 1
    pred[1] = 0                                         # row 1: every token wrong, EOS too
    pred[2, 6] = 0                                      # row 2: only the last token before EOS wrong
    pred[3, 2] = 0                                      # row 3: only the first wrong
    pred[4, 7] = 0                                      # row 4: only EOS wrong
    pred[5, 2], pred[5, 5:] = 0, EOS                    # row 5: the first wrong, pad == eos predicted on padding
    pred[6, 7] = 0                                      # row 6: its last token (not EOS) wrong
    pred[7, 7] = 0                                      # row 7: EOS wrong
    pred[8, [3, 5]] = 0                                 # row 8: tokens 2 and 4 wrong: k* = 4
    logits = torch.nn.functional.one_hot(torch.cat([pred, pred[:, -1:]], 1), V).float()
    es = eval_tofu.es_from_logits(logits, labels, EOS).tolist()
    assert es == [1.0, 0.0, 0.0, 1 - 1 / 5, 1.0, 1 - 1 / 2, 0.0, 1.0, 1 - 4 / 5]
    es_eos = eval_tofu.es_from_logits(logits, labels, EOS, with_eos=True).tolist()
    assert es_eos == [1.0, 0.0, 1 - 5 / 6, 1 - 1 / 6, 0.0, 1 - 1 / 3, 0.0, 0.0, 1 - 4 / 6]


def test_score_does_not_depend_on_batching(tiny):
    model, tok = tiny
    ex = es_cases(tok)[::3]
    lp1, es1 = eval_tofu.score(noisy_copy(model, 0.5), tok, ex, batch_size=1)
    lp8, es8 = eval_tofu.score(noisy_copy(model, 0.5), tok, ex, batch_size=8)
    assert es1 == es8 and max(abs(a - b) for a, b in zip(lp1, lp8)) < 1e-5
    # and the mean log-prob is that of common.answer_logprobs on the row alone
    logp, mask = common.answer_logprobs(model, common.collate(ex[:1], tok.pad_token_id))
    assert eval_tofu.score(model, tok, ex[:1])[0][0] == pytest.approx((logp.sum() / mask.sum()).item(), abs=1e-6)


def test_quick_es(tiny):
    model, tok = tiny
    split = common.split_data("forget05")
    split = dict(forget=split["forget"][:12], retain_eval=split["retain_eval"][:12])
    model.train()
    es = eval_tofu.quick_es(model, tok, split, QA, batch_size=5)
    assert model.training  # the caller's mode is left as it was
    model.eval()
    assert es["forget"] == pytest.approx(sum(eval_tofu.es_exact(model, tok, split["forget"], QA)) / 12)
    assert es["retain"] == pytest.approx(sum(eval_tofu.es_exact(model, tok, split["retain_eval"], QA)) / 12)
    assert es["forget"] > 0.9  # the target model knows the forget set


# ----------------------------------------------------------------------------- generation

def test_batched_generation_equals_unbatched(tiny):
    """Left padding with the attention mask: every row generates what it generates alone, on the
    target model and on a shaken copy whose greedy choices are far less clear-cut."""
    model, tok = tiny
    split = common.split_data("forget05")
    rows = split["forget"][:12] + split["retain_eval"][:12]
    ex = common.encode_rows(tok, QA, rows)
    for m in (model, noisy_copy(model, 1.0)):
        alone = eval_tofu.generate(m, tok, ex, batch_size=1, max_new_tokens=40)
        for bs in (8, 24):
            assert eval_tofu.generate(m, tok, ex, batch_size=bs, max_new_tokens=40) == alone
    assert sum(g == r["answer"] for g, r in zip(eval_tofu.generate(model, tok, ex), rows)) >= 22


def test_greedy_gives_generates_tokens(tiny):
    """greedy (the cache grown in place, the ended rows dropped from the batch) against transformers'
    model.generate, token for token: on the target model, whose rows end at different steps, and on shaken
    copies, one of whose rows run to the cap while others end; and through a LoRA model's forward."""
    model, tok = tiny
    split = common.split_data("forget05")
    ex = common.encode_rows(tok, QA, split["forget"][:16] + split["retain_eval"][:16])
    ids, attn = eval_tofu.left_pad([e["prompt_ids"] for e in ex], tok.pad_token_id)
    T = ids.shape[1]
    assert all(ids[j, T - len(e["prompt_ids"]):].tolist() == e["prompt_ids"] for j, e in enumerate(ex))
    assert attn.sum(1).tolist() == [len(e["prompt_ids"]) for e in ex] and (ids[attn == 0] == tok.pad_token_id).all()
    lengths = []
    lora = common.add_lora(noisy_copy(model, 1.0, seed=1), SimpleNamespace(
        lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets="all-linear", seed=0))  # PEFT's forward around it
    for m in (model, noisy_copy(model, 1.0), noisy_copy(model, 2.0), lora.eval()):
        out = m.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=48,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, T:].tolist()
        want = [row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row for row in out]
        got = eval_tofu.greedy(m, ids, attn, 48, tok.eos_token_id, tok.pad_token_id)
        assert got == want
        lengths.append(sorted(len(g) for g in got))
    assert lengths[0][-1] < 48  # the target model: every row ends, ...
    assert lengths[2][0] < 10 and lengths[2][-1] == 48  # ... and rows that end early beside rows at the cap


def test_score_without_logprobs(tiny):
    """score(logp=False): the same ES as with the log-probs, which it does not compute."""
    model, tok = tiny
    ex = common.encode_rows(tok, QA, common.split_data("forget05")["forget"][:20])
    m = noisy_copy(model, 0.5)
    logp, es = eval_tofu.score(m, tok, ex, batch_size=8)
    none, es2 = eval_tofu.score(m, tok, ex, batch_size=8, logp=False)
    assert none is None and es2 == es and len(logp) == 20 and 0 < sum(es) < 20


def test_rouge_l_recall():
    r = eval_tofu.rouge_l_recall(["The cat sat on the mat.", "Jane Austen wrote it", "a b c d"],
                                 ["the cats sat on a mat", "Jane Austen", "x y z"])
    assert r[0] == pytest.approx(5 / 6) and r[1] == pytest.approx(2 / 4) and r[2] == 0  # 'cats' stems to 'cat'


# ----------------------------------------------------------------------------- TOFU's numbers by hand

def test_probability_and_truth_ratio_by_hand():
    L = math.log
    p = eval_tofu.normalised_prob([L(0.5), L(0.2)], [[L(0.25), L(0.25)], [L(0.1)] * 3])
    assert p == pytest.approx([0.5, 0.4])
    assert eval_tofu.normalised_prob([-1000.0], [[-1001.0]])[0] == pytest.approx(1 / (1 + math.exp(-1)))
    r = eval_tofu.truth_ratio([L(0.5), L(0.1)], [[L(0.2), L(0.05)], [L(0.4)]])
    assert r == pytest.approx([0.2, 4.0])  # geomean(0.2, 0.05) = 0.1; 0.1 / 0.5
    assert eval_tofu.truth_ratio_stat([0.5, 2.0, 1.0], forget=True) == pytest.approx(2 / 3)
    assert eval_tofu.truth_ratio_stat([0.5, 2.0, 0.25], forget=False) == pytest.approx((0.5 + 0 + 0.75) / 3)
    huge = eval_tofu.truth_ratio([-2000.0], [[-1.0]])  # P̄(base) underflows: R stays a finite float
    assert math.isfinite(huge[0]) and eval_tofu.truth_ratio_stat(huge, forget=True) < 1e-300


def test_model_utility_is_scipy_hmean():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = (torch.rand(9, generator=g, dtype=torch.float64) + 1e-3).tolist()
        assert eval_tofu.model_utility(v) == pytest.approx(hmean(v), rel=1e-12)
    assert eval_tofu.model_utility([0.5] * 8 + [0.0]) == 0.0 == hmean([0.5] * 8 + [0.0])


def test_forget_quality_is_ks_2samp():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, generator=g).tolist()
    b = (torch.rand(40, generator=g) * 1.5).tolist()
    p = eval_tofu.forget_quality(a, b)
    assert p == ks_2samp(a, b).pvalue and 0 < p < 1
    # TOFU tests exp(perturbed loss - paraphrased loss) = 1/R: the same p-value
    assert ks_2samp([1 / x for x in a], [1 / x for x in b]).pvalue == pytest.approx(p, rel=1e-9)
    assert eval_tofu.forget_quality(a, a) == 1.0


def test_evaluate_matches_its_parts(tiny):
    """Aggregates from the per-row values, per-row values from single-row computations."""
    model, tok = tiny
    sets = eval_tofu.load_sets("forget01", "builtin", max_samples=4)
    res = eval_tofu.evaluate(model, tok, sets, QA, batch_size=3, progress=False)
    per, m = res["per_sample"], res["metrics"]
    qa, pert, _ = sets["forget"]
    row = pert[1]

    def mean_logp(q, a):
        logp, mask = common.answer_logprobs(model, common.collate([common.encode(tok, QA, q, a)], tok.pad_token_id))
        return (logp.sum() / mask.sum()).item()

    assert per["forget"]["prob"][1] == pytest.approx(math.exp(mean_logp(qa[1]["question"], qa[1]["answer"])), rel=1e-5)
    want_r = math.exp(sum(mean_logp(row["question"], p) for p in row["perturbed_answer"]) / 5
                      - mean_logp(row["question"], row["paraphrased_answer"]))
    assert per["forget"]["truth_ratio"][1] == pytest.approx(want_r, rel=1e-4)
    wf = sets["world_facts"][1][2]
    t, ps = mean_logp(wf["question"], wf["answer"]), [mean_logp(wf["question"], p) for p in wf["perturbed_answer"]]
    want_p = math.exp(t) / (math.exp(t) + sum(map(math.exp, ps)))
    assert per["world_facts"]["prob"][2] == pytest.approx(want_p, rel=1e-4)
    assert per["forget"]["es_perturb"] == eval_tofu.es_exact(model, tok, pert, QA, question="paraphrased_question")
    for name in eval_tofu.SETS:
        assert len(per[name]["prob"]) == len(per[name]["rouge"]) == len(per[name]["truth_ratio"]) == 4
        assert m[name]["prob"] == pytest.approx(sum(per[name]["prob"]) / 4)
        assert m[name]["rouge"] == pytest.approx(sum(per[name]["rouge"]) / 4)
    assert m["forget"]["truth_ratio"] == pytest.approx(eval_tofu.truth_ratio_stat(per["forget"]["truth_ratio"], True))
    nine = [m[s][k] for s in ("retain", "real_authors", "world_facts") for k in ("prob", "rouge", "truth_ratio")]
    assert res["model_utility"] == pytest.approx(hmean(nine))
    assert m["forget"]["es_exact"] == 1.0 and m["forget"]["rouge"] == 1.0  # the target model knows these rows


def test_evaluation_on_the_real_tofu_files(tofu_dir, tiny):
    """Every config the evaluation reads, from the real files, through the tiny model."""
    model, tok = tiny
    for split in common.SPLITS:
        sets = eval_tofu.load_sets(split, tofu_dir, max_samples=3)
        assert [len(sets[k][1][0]["perturbed_answer"]) for k in eval_tofu.SETS] == [5, 3, 3, 5]
        res = eval_tofu.evaluate(model, tok, sets, QA, max_new_tokens=8, progress=False)
        for name, m in res["metrics"].items():
            assert all(0 <= v <= 1 for v in m.values()), (split, name, m)
        assert 0 <= res["model_utility"] <= 1
        assert res["per_sample"]["forget"]["question"] == [r["question"] for r in common.load_tofu(split, tofu_dir)[:3]]


# ----------------------------------------------------------------------------- the command

def retain_stats(path, split="forget05", n=None, ratios=None):
    q = [r["question"] for r in common.load_tofu(split)][:n]
    ratios = ratios or [0.3 + 0.02 * i for i in range(len(q))]
    path.write_text(json.dumps(dict(split=split, per_sample=dict(forget=dict(question=q, truth_ratio=ratios)))))
    return ratios


def model_copy(tiny_path, dst, with_args=True):
    shutil.copytree(tiny_path, dst, ignore=shutil.ignore_patterns("eval*.json", *([] if with_args else ["args.json"])))
    return dst


def test_eval_command(tiny_path, tmp_path):
    """A model folder made by finetune.py: data and template from its args.json, eval.json beside it,
    FQ against hand-made retain statistics."""
    ratios = retain_stats(tmp_path / "rs.json")
    model = model_copy(tiny_path, tmp_path / "m")
    r = run_script("eval_tofu.py", "--model", str(model), "--max-samples", "6", "--retain-stats",
                   str(tmp_path / "rs.json"), "--batch-size", "4", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert ("| ES-exact retain ↑ | ES-exact unlearn ↓ | ES-perturb retain ↑ | ES-perturb unlearn ↓ | MU ↑ | log10 FQ ↑ "
            "| PrivLeak → 0 | Min-K%++ AUC → 0.5 |") in r.stdout.splitlines()
    d = json.load(open(model / "eval.json"))
    assert not (model / "eval.json.tmp").exists()
    assert d["data"] == "builtin" and d["template"] == QA and d["split"] == "forget05"
    assert d["rows"] == dict(retain=6, real_authors=6, world_facts=6, forget=6)
    fq = ks_2samp(d["per_sample"]["forget"]["truth_ratio"], ratios[:6]).pvalue
    assert d["forget_quality"] == pytest.approx(fq) and d["log10_forget_quality"] == pytest.approx(math.log10(fq))
    s = d["summary"]
    assert s["es_exact_unlearn"] == sum(d["per_sample"]["forget"]["es_exact"]) / 6
    assert s["es_perturb_retain"] == sum(d["per_sample"]["retain"]["es_perturb"]) / 6
    line = r.stdout.splitlines()[r.stdout.splitlines().index("| --- | --- | --- | --- | --- | --- | --- | --- |") + 1]
    assert line == "| " + " | ".join(f"{s[k]:.4f}" for k in ("es_exact_retain", "es_exact_unlearn",
                                                              "es_perturb_retain", "es_perturb_unlearn",
                                                              "model_utility", "log10_forget_quality")) \
        + f" | {d['privleak']:.2f} | {d['mia']['min_k_pp']['auc']:.4f} |"


def test_eval_without_retain_reference(tiny_path, tmp_path):
    """A folder that names no preset: FQ is reported as unavailable, never as a number."""
    model = model_copy(tiny_path, tmp_path / "m", with_args=False)
    r = run_script("eval_tofu.py", "--model", str(model), "--data", "builtin", "--max-samples", "3",
                   "--max-new-tokens", "4", "--out", str(tmp_path / "o" / "e.json"))
    assert r.returncode == 0, r.stderr
    d = json.load(open(tmp_path / "o" / "e.json"))
    assert d["forget_quality"] is None and d["log10_forget_quality"] is None and "unavailable" in d["fq_reference"]
    lines = r.stdout.splitlines()
    assert lines[lines.index("| --- | --- | --- | --- | --- | --- | --- | --- |") + 1].split(" | ")[5] == "n/a"
    assert "FQ: unavailable" in r.stdout
    assert not (model / "eval.json").exists()


def test_fq_against_a_retain_model(tiny_path, tmp_path, capsys):
    """--retain-model: its forget-set truth ratios are computed and kept, the model is named in the FQ
    line and eval.json; against itself, p = 1, with a warning that says so."""
    res = eval_tofu.main(["--model", tiny_path, "--retain-model", tiny_path, "--max-samples", "5",
                          "--max-new-tokens", "4", "--out", str(tmp_path / "e.json")])
    d = json.load(open(tmp_path / "e.json"))
    assert d["forget_quality"] == res["forget_quality"] == 1.0 and d["log10_forget_quality"] == 0.0
    assert d["fq_retain_truth_ratio"] == d["per_sample"]["forget"]["truth_ratio"] and tiny_path in d["fq_reference"]
    assert d["fq_retain_model"] == tiny_path and "is the model under evaluation" in d["fq_warning"]
    out, err = capsys.readouterr()
    assert f"FQ: p = 1 against the retain-only model {tiny_path} (--retain-model) (warning: --retain-model" in out
    assert [line for line in err.splitlines() if "warning" in line] == [
        f"eval_tofu.py: warning: --retain-model {tiny_path} is the model under evaluation: FQ is 1 by construction"]
    other = eval_tofu.main(["--model", tiny_path, "--retain-stats", str(tmp_path / "e.json"), "--max-samples", "5",
                            "--max-new-tokens", "4", "--out", str(tmp_path / "e2.json")])
    assert other["forget_quality"] == 1.0  # its own eval.json as --retain-stats: the same numbers


def test_retain_model_that_is_the_target_model(tiny_path, tmp_path, capsys, monkeypatch):
    """An unlearned model (its args.json names --model tiny) against the tiny target model as 'retain-only'
    model: one warning line; the preset's own retain-only model gives none. That one is a stand-in
    here, a copy at its own path (fine-tuning the real one takes minutes; test_first_use builds one)."""
    stand_in = str(model_copy(tiny_path, tmp_path / "retain95"))
    monkeypatch.setattr(eval_tofu, "tiny_retain_model", lambda split, data="builtin": stand_in)
    model = model_copy(tiny_path, tmp_path / "m")  # args.json: fine-tuned with --model tiny on builtin
    argv = ["--model", str(model), "--max-samples", "3", "--max-new-tokens", "2", "--out", str(tmp_path / "e.json")]
    d = eval_tofu.main(argv + ["--retain-model", "tiny"])
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]  # not the progress bars
    assert len(err) == 1 and err[0].startswith(f"eval_tofu.py: warning: --retain-model {tiny_path} is the target model")
    assert d["fq_retain_model"] == tiny_path and "target model" in d["fq_warning"]
    d = eval_tofu.main(argv)  # the tiny preset's own retain-only model, by default
    assert d["fq_retain_model"] == stand_in and d["fq_warning"] is None and "warning" not in capsys.readouterr().err


def test_no_fq_skips_forget_quality_and_its_model(tiny_path, tmp_path, monkeypatch, capsys):
    """--no-fq: no retain-only model is loaded or built; FQ is null in eval.json with the reason, and
    'n/a (skipped)' in the printed row."""
    model = model_copy(tiny_path, tmp_path / "m")  # names the tiny preset: FQ would use out/tiny/retain95
    monkeypatch.setattr(eval_tofu, "tiny_retain_model", lambda *a: pytest.fail("retain-only model requested"))
    res = eval_tofu.main(["--model", str(model), "--no-fq", "--max-samples", "3", "--max-new-tokens", "2"])
    d = json.load(open(model / "eval.json"))
    assert d["forget_quality"] is d["log10_forget_quality"] is d["summary"]["log10_forget_quality"] is None
    assert d["fq_skipped"] is True and d["fq_reference"] == "skipped (--no-fq)" and d["fq_retain_model"] is None
    assert res["fq_skipped"] is True
    lines = capsys.readouterr().out.splitlines()
    assert lines[lines.index("| --- | --- | --- | --- | --- | --- | --- | --- |") + 1].split(" | ")[5] == "n/a (skipped)"
    assert "FQ: skipped (--no-fq)" in lines
    with pytest.raises(SystemExit) as e:
        eval_tofu.main(["--model", str(model), "--no-fq", "--retain-model", tiny_path])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_es_eos_flag(tiny, tiny_path, tmp_path):
    """--es-eos reaches every ES and is recorded in eval.json; without it, EOS is left out."""
    model, tok = tiny
    retain_stats(tmp_path / "rs.json")
    argv = ["--model", tiny_path, "--max-samples", "4", "--max-new-tokens", "4", "--retain-stats",
            str(tmp_path / "rs.json"), "--out", str(tmp_path / "e.json")]
    rows = eval_tofu.load_sets("forget05", "builtin", 4)["forget"][1]
    es = []
    for flag in ([], ["--es-eos"]):
        d = eval_tofu.main(argv + flag)
        assert json.load(open(tmp_path / "e.json"))["es_eos"] is d["es_eos"] is bool(flag)
        es.append(d["per_sample"]["forget"]["es_perturb"])
        assert es[-1] == eval_tofu.es_exact(model, tok, rows, QA, question="paraphrased_question", with_eos=bool(flag))
    assert es[0] != es[1]


def test_tiny_retain_model_is_built_on_first_use(tmp_path, short_builds):
    path = eval_tofu.tiny_retain_model("forget10")
    assert path == str(tmp_path / "tiny" / "retain90") and os.path.isfile(os.path.join(path, "model.safetensors"))
    assert json.load(open(os.path.join(path, "args.json")))["split"] == "retain90"
    assert eval_tofu.tiny_retain_model("forget10") == path and len(short_builds) == 1  # cached


@pytest.mark.parametrize("case,msg", [
    ("missing_model", "does not exist"),
    ("split", "unknown split"),
    ("max_samples", "--max-samples must be >= 1"),
    ("data", "does not exist"),
    ("stats_not_json", "is not valid JSON"),
    ("stats_fields", "is not an eval.json"),
    ("stats_split", "is for split forget01, not forget05"),
    ("stats_rows", "was computed on other forget rows"),
    ("stats_missing", "cannot read --retain-stats"),
])
def test_bad_input(case, msg, tmp_path, tiny_path, capsys):
    out = tmp_path / "out" / "e.json"
    argv = {"missing_model": ["--model", str(tmp_path / "nope")], "split": ["--split", "forget07"],
            "max_samples": ["--max-samples", "0"], "data": ["--data", str(tmp_path / "nowhere")]}.get(case, [])
    stats = tmp_path / "rs.json"
    if case == "stats_not_json":
        stats.write_text('{"split": "forget05", ')
    elif case == "stats_fields":
        stats.write_text('{"split": "forget05", "per_sample": {"forget": {"question": ["q"], "truth_ratio": ["x"]}}}')
    elif case == "stats_split":
        retain_stats(stats, split="forget01")
    elif case == "stats_rows":
        retain_stats(stats)
        d = json.loads(stats.read_text())
        d["per_sample"]["forget"]["question"][1] = "Who else?"
        stats.write_text(json.dumps(d))
    if case.startswith("stats"):
        argv = ["--retain-stats", str(stats)]
    with pytest.raises(SystemExit) as e:
        eval_tofu.main(argv + ["--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not out.parent.exists() and not common.tiny_dir(str(tmp_path / "nowhere")).exists()  # nothing written


def test_bad_input_from_the_command_line(tmp_path):
    r = run_script("eval_tofu.py", "--max-samples", "-3", "--out", str(tmp_path / "e.json"))
    assert r.returncode == 2 and r.stderr.strip() == "eval_tofu.py: error: --max-samples must be >= 1, got -3"
    assert not os.listdir(tmp_path)
