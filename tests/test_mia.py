"""eval_tofu.py's membership-inference attacks: each score by hand and by float64 brute force, the AUC
against a count of pairs, PrivLeak, and what the command writes and prints."""
import json
import math
import zlib

import pytest
import torch

import common
import eval_tofu
from conftest import run_main

QA = common.QA_TEMPLATE
LN2 = math.log(2)
P = [0.5, 0.25, 0.125, 0.125]  # every answer position's next-token distribution below: log p = -bits ln 2
MU_BITS = 1.75                   # -mu / ln 2 = sum p bits
SIGMA_BITS = math.sqrt(0.5 * 1 + 0.25 * 4 + 0.25 * 9 - MU_BITS ** 2)  # sigma / ln 2 = sqrt(0.6875)
BITS = [1, 2, 3, 3]              # of tokens 0, 1, 2, 3


def hand_batch():
    """Three right-padded rows after a 2-token prompt, EOS = 3: answers [0, 1, 2, 0, 1], [0, 2, 1] and none
    (EOS alone). Every answer position has the distribution P; the EOS position gives EOS a probability of
    about e^-20, so that counting it would change every score."""
    EOS, T = 3, 9
    labels = torch.full((3, T), -100)
    labels[0, 2:8] = torch.tensor([0, 1, 2, 0, 1, EOS])
    labels[1, 2:6] = torch.tensor([0, 2, 1, EOS])
    labels[2, 2] = EOS
    logits = torch.zeros(3, T, 4, dtype=torch.float64)
    logits[:, :] = torch.tensor(P, dtype=torch.float64).log()
    for row, eos_at in ((0, 7), (1, 5), (2, 2)):
        logits[row, eos_at - 1] = torch.tensor([0.0, 0.0, 0.0, -20.0], dtype=torch.float64)  # predicts the EOS
    return logits, labels, EOS


def test_scores_by_hand():
    logits, labels, eos = hand_batch()
    s = eval_tofu.mia_from_logits(logits, labels, eos, k=0.4)
    # row 0: bits 1 2 3 1 2, n = 5, m = int(5 * 0.4) = 2: the two lowest log-probs are bits 3 and 2
    # row 1: bits 1 3 2, n = 3, m = int(1.2) = 1: bits 3; row 2: no answer token, 0 on each
    assert s["loss"] == pytest.approx([9 / 5 * LN2, 2 * LN2, 0.0], rel=1e-12)
    assert s["min_k"] == pytest.approx([2.5 * LN2, 3 * LN2, 0.0], rel=1e-12)
    # z = (log p(y) - mu) / sigma = (1.75 - bits) / sigma_bits; the lowest z: the most bits
    z = lambda b: (MU_BITS - b) / SIGMA_BITS
    assert s["min_k_pp"] == pytest.approx([-(z(3) + z(2)) / 2, -z(3), 0.0], rel=1e-12)
    # k = 1: Min-K% is LOSS; the answer text's zlib length divides LOSS
    s1 = eval_tofu.mia_from_logits(logits, labels, eos, k=1.0)
    assert s1["min_k"] == pytest.approx(s["loss"], rel=1e-12)
    assert s1["min_k_pp"][0] == pytest.approx(-sum(z(b) for b in (1, 2, 3, 1, 2)) / 5, rel=1e-12)
    answers = ["Jane Austen wrote it.", "ab" * 40]
    assert eval_tofu.zlib_scores([1.5, 2.0], answers) == [1.5 / len(zlib.compress(answers[0].encode("utf-8"))),
                                                          2.0 / len(zlib.compress(answers[1].encode("utf-8")))]
    assert len(zlib.compress(answers[1].encode())) < 20  # a repetitive answer compresses: a larger ZLib score


def test_min_k_pp_sigma_clamp():
    """A uniform next-token distribution has sigma = 0: clamped at 1e-6 (sigma 1e-3), z = 0, not 0/0."""
    logits, labels, eos = hand_batch()
    logits[0, :6] = 0.0  # uniform at the first five answer positions of row 0
    s = eval_tofu.mia_from_logits(logits, labels, eos, k=0.4)
    assert s["min_k_pp"][0] == pytest.approx(0.0, abs=1e-9) and s["loss"][0] == pytest.approx(math.log(4), rel=1e-12)


def brute_force(logits, labels, eos_id, k):
    """Min-K% and Min-K%++ of each row with Python floats (float64), vocabulary entry by entry, EOS left out by
    reading the labels left to right; sigma^2 as E[(log p)^2] - mu^2, clamped at 1e-6."""
    out = dict(min_k=[], min_k_pp=[])
    for row in range(labels.shape[0]):
        pos = [t for t in range(1, labels.shape[1]) if labels[row, t] != -100]
        if pos and labels[row, pos[-1]] == eos_id:
            pos = pos[:-1]
        lps, zs = [], []
        for t in pos:
            x = [float(v) for v in logits[row, t - 1]]
            top = max(x)
            lse = top + math.log(sum(math.exp(v - top) for v in x))
            lp = [v - lse for v in x]
            mu = sum(math.exp(a) * a for a in lp)
            var = max(sum(math.exp(a) * a * a for a in lp) - mu * mu, 1e-6)
            y = lp[int(labels[row, t])]
            lps.append(y)
            zs.append((y - mu) / math.sqrt(var))
        m = max(1, int(len(pos) * k))
        out["min_k"].append(-sum(sorted(lps)[:m]) / m)
        out["min_k_pp"].append(-sum(sorted(zs)[:m]) / m)
    return out


def test_min_k_pp_against_float64_brute_force():
    """float32 logits (as a model on CPU gives), rows of 1 to 14 answer tokens, some without EOS, some
    distributions flat and some peaked (scale 8); against the brute force on the same float32 values."""
    g = torch.Generator().manual_seed(0)
    B, T, V, EOS = 6, 18, 37, 5
    logits = torch.randn(B, T, V, generator=g) * torch.tensor([0.5, 1, 2, 4, 8, 1])[:, None, None]
    labels = torch.full((B, T), -100)
    for row, (start, n, eos) in enumerate([(2, 14, True), (3, 5, True), (4, 1, True), (1, 9, False), (2, 7, True),
                                           (6, 11, False)]):
        labels[row, start:start + n] = torch.randint(0, V, (n,), generator=g)
        if eos:
            labels[row, start + n] = EOS
    labels[labels == EOS] = EOS  # (an answer token may be EOS-valued too: only the last labelled one is dropped)
    for k in (0.4, 0.2, 1.0):
        mine = eval_tofu.mia_from_logits(logits, labels, EOS, k)
        want = brute_force(logits, labels, EOS, k)
        assert mine["min_k"] == pytest.approx(want["min_k"], rel=1e-5)
        assert mine["min_k_pp"] == pytest.approx(want["min_k_pp"], rel=1e-4, abs=1e-5)


def test_score_pass_gives_the_scores_of_each_row_alone(tiny):
    """In score's pass, batched and padded, each row's scores are those of the row alone; Probability and ES
    are the same with and without them."""
    model, tok = tiny
    ex = common.encode_rows(tok, QA, common.load_tofu("forget05")[:6] + common.load_tofu("holdout05")[:6])
    lp, es, mia = eval_tofu.score(model, tok, ex, batch_size=5, mia_k=0.4)
    assert (lp, es) == eval_tofu.score(model, tok, ex, batch_size=5)
    for i, e in enumerate(ex):
        batch = common.collate([e], tok.pad_token_id)
        alone = eval_tofu.mia_from_logits(model(input_ids=batch["input_ids"]).logits, batch["labels"],
                                          tok.eos_token_id, 0.4)
        for name in ("loss", "min_k", "min_k_pp"):
            assert mia[name][i] == pytest.approx(alone[name][0], rel=1e-4, abs=1e-6), (name, i)
        # LOSS: the mean NLL of the answer tokens without the EOS, here in float64 from the logits. float32's
        # log-softmax is off by up to ~1e-5 at log-probs near 0 (memorised tokens): absolute, on scores of 1e-2..3
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1].double()
        ids = e["input_ids"]
        n0 = e["labels"].count(-100)
        want = -sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(n0, len(ids) - 1)) / (len(ids) - 1 - n0)
        assert mia["loss"][i] == pytest.approx(want, abs=1e-4)
    assert max(mia["loss"][:6]) < min(mia["loss"][6:])  # the target model knows its forget rows, not holdout's


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return common.load_model(tiny_path, frozen=True), common.load_tokenizer(tiny_path)


# ----------------------------------------------------------------------------- AUC and PrivLeak

def test_auc_is_a_count_of_pairs():
    g = torch.Generator().manual_seed(1)
    forget = torch.randint(0, 6, (23,), generator=g).double().tolist()  # many ties
    holdout = (torch.randint(0, 6, (17,), generator=g) + 1).double().tolist()
    above = sum(h > f for f in forget for h in holdout)
    ties = sum(h == f for f in forget for h in holdout)
    assert eval_tofu.auc(forget, holdout) == pytest.approx((above + ties / 2) / (23 * 17), rel=1e-12)
    assert eval_tofu.auc([0.1, 0.2], [0.3, 0.4, 0.5]) == 1.0   # every member scores lower: told apart
    assert eval_tofu.auc([0.3, 0.4, 0.5], [0.1, 0.2]) == 0.0
    assert eval_tofu.auc([1.0] * 4, [1.0] * 3) == 0.5
    with pytest.raises(common.NonFinite, match="Min-K% score of row 1 of the holdout set is nan"):
        eval_tofu.auc([0.1], [0.2, float("nan")], "Min-K%")


def test_privleak_by_hand():
    assert eval_tofu.privleak(0.9, 0.6) == pytest.approx(100 * (0.1 - 0.4) / 0.4)  # -75: under-unlearned
    assert eval_tofu.privleak(0.9) == pytest.approx(-80.0)                          # r = 0.5 without a reference
    assert eval_tofu.privleak(0.3, 0.5) == pytest.approx(40.0)                      # over-unlearned
    assert eval_tofu.privleak(0.7, 0.7) == 0.0 and eval_tofu.privleak(0.5, 1.0) is None


def test_mia_report_by_hand():
    """Reference = LOSS(model) - LOSS(retain-only model), row by row; each AUC from its own two lists."""
    mine = dict(loss=dict(forget=[1.0, 2.0], holdout=[3.0, 4.0]), min_k=dict(forget=[5.0, 1.0], holdout=[2.0, 3.0]),
                min_k_pp=dict(forget=[0.0, 0.0], holdout=[0.0, 0.0]))
    answers = dict(forget=["a", "b"], holdout=["c", "d"])
    r = eval_tofu.mia_report(mine, answers, ref_loss=dict(forget=[0.5, 0.5], holdout=[1.0, 5.0]))
    assert r["reference"]["forget"] == [0.5, 1.5] and r["reference"]["holdout"] == [2.0, -1.0]
    assert r["reference"]["auc"] == 0.5 and r["loss"]["auc"] == 1.0 and r["min_k_pp"]["auc"] == 0.5
    assert r["min_k"]["auc"] == 0.5  # pairs (5, 2) (5, 3) lost, (1, 2) (1, 3) won
    assert r["zlib"]["holdout"] == [3.0 / len(zlib.compress(b"c")), 4.0 / len(zlib.compress(b"d"))]
    assert "gradnorm" not in r and eval_tofu.mia_report(mine, answers)["reference"] is None


def test_gradnorm_against_backward(tiny):
    """GradNorm: the mean over parameter tensors of the 2-norm of the gradient of the row's LOSS, against
    .backward() on the loss computed from the logits by hand; the model's flags and .grad stay as they were."""
    model, tok = tiny
    ex = common.encode_rows(tok, QA, common.load_tofu("forget05")[:2] + common.load_tofu("holdout05")[:1])
    got = eval_tofu.gradnorm(model, tok, ex)
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    import copy
    m = copy.deepcopy(model).requires_grad_(True)
    for i, e in enumerate(ex):
        m.zero_grad()
        ids = torch.tensor([e["input_ids"]])
        n0, n = e["labels"].count(-100), len(e["input_ids"]) - 1  # the answer without its EOS: tokens n0 .. n - 1
        logp = torch.log_softmax(m(input_ids=ids).logits[0].double(), -1)
        (-sum(logp[t - 1, e["input_ids"][t]] for t in range(n0, n)) / (n - n0)).backward()
        norms = [p.grad.double().pow(2).sum().sqrt().item() for p in m.parameters()]
        # float32 against float64: 1 - p of a memorised token (~1e-3) carries float32's error of p (~1e-7)
        assert got[i] == pytest.approx(sum(norms) / len(norms), rel=2e-3)
    assert got[2] > max(got[:2])  # an unseen row pulls harder than a memorised one


# ----------------------------------------------------------------------------- the command

def row_cells(stdout):
    lines = stdout.splitlines()
    return [c.strip() for c in lines[lines.index("| --- | --- | --- | --- | --- | --- | --- | --- |") + 1].split("|")[1:-1]]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, tiny_path):
    """A folder with an untrained model of the tiny preset's shape: it tells forget rows from holdout rows by
    chance only, so its Min-K% AUC is neither 0 nor 1 and PrivLeak against it is defined."""
    import finetune
    tok = common.load_tokenizer(tiny_path)
    path = tmp_path_factory.mktemp("untrained")
    finetune.tiny_model(tok, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_retain_model_against_itself(untrained, tmp_path):
    """The retain-only model is the model under evaluation: PrivLeak 0 and Reference 0 on every row; eval.json
    carries every score with its AUC and per-row values, the printed row PrivLeak and the Min-K%++ AUC."""
    out = tmp_path / "e.json"
    r = run_main("eval_tofu.py", "--model", untrained, "--retain-model", untrained, "--data", "builtin",
                 "--max-samples", "8", "--max-new-tokens", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    d = json.load(open(out))
    mia = d["mia"]
    assert set(mia) == {"k", "holdout", "rows", "retain_min_k_auc", "loss", "zlib", "min_k", "min_k_pp", "reference"}
    assert mia["holdout"] == "holdout05" and mia["rows"] == dict(forget=8, holdout=8) and mia["k"] == 0.4
    for name in ("loss", "zlib", "min_k", "min_k_pp", "reference"):
        assert set(mia[name]) == {"auc", "forget", "holdout"} and len(mia[name]["holdout"]) == 8
        assert mia[name]["auc"] == pytest.approx(eval_tofu.auc(mia[name]["forget"], mia[name]["holdout"]))
    assert max(map(abs, mia["reference"]["forget"] + mia["reference"]["holdout"])) < 1e-5
    assert 0 < mia["min_k"]["auc"] < 1 and mia["retain_min_k_auc"] == mia["min_k"]["auc"]
    assert d["privleak"] == 0.0 == d["summary"]["privleak"] and untrained in d["privleak_reference"]
    answers = [row["answer"] for row in common.load_tofu("forget05")[:8]]
    assert mia["zlib"]["forget"] == [x / len(zlib.compress(a.encode())) for x, a in zip(mia["loss"]["forget"], answers)]
    assert row_cells(r.stdout)[6:] == ["0.00", f"{mia['min_k_pp']['auc']:.4f}"]
    assert eval_tofu.HEADER.endswith("| log10 FQ ↑ | PrivLeak → 0 | Min-K%++ AUC → 0.5 |") and eval_tofu.HEADER in r.stdout


def test_privleak_against_retain_stats_and_without(untrained, tiny_path, tmp_path):
    """Without a retain-only model (--no-fq), r = 0.5. An eval.json of the retain-only model as --retain-stats
    gives its LOSS and Min-K% (here: the model itself, so Reference 0 and PrivLeak 0); one computed with
    another --mia-k gives neither, and says so."""
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    argv = ["--model", untrained, "--data", "builtin", "--max-samples", "6", "--max-new-tokens", "2"]
    r = run_main("eval_tofu.py", *argv, "--no-fq", "--mia-k", "1", "--out", first)
    assert r.returncode == 0, r.stderr
    d = json.load(open(first))
    s = 1 - d["mia"]["min_k"]["auc"]
    assert d["mia"]["reference"] is None and d["mia"]["retain_min_k_auc"] is None
    assert d["privleak"] == pytest.approx(100 * (s - 0.5) / 0.5) and d["privleak_reference"].startswith("r = 0.5")
    assert d["mia"]["min_k"]["forget"] == pytest.approx(d["mia"]["loss"]["forget"], rel=1e-12)  # k = 1: LOSS
    assert row_cells(r.stdout)[6] == f"{d['privleak']:.2f}" and d["summary"]["privleak"] == d["privleak"]
    r = run_main("eval_tofu.py", *argv, "--mia-k", "1", "--retain-stats", first, "--out", second)
    assert r.returncode == 0, r.stderr
    e = json.load(open(second))
    assert e["mia"]["reference"]["forget"] == [0.0] * 6 and e["mia"]["retain_min_k_auc"] == d["mia"]["min_k"]["auc"]
    assert e["privleak"] == 0.0 and f"the retain stats {first}" in e["privleak_reference"]
    r = run_main("eval_tofu.py", *argv, "--retain-stats", first, "--out", second)  # --mia-k 0.4 here
    e = json.load(open(second))
    assert e["mia"]["reference"] is None and "--mia-k 1.0" in e["privleak_reference"]
    assert e["privleak"] == pytest.approx(100 * (1 - e["mia"]["min_k"]["auc"] - 0.5) / 0.5)
    # the tiny target model knows its forget rows and not the holdout rows: AUC 1, PrivLeak -100 (r = 0.5)
    r = run_main("eval_tofu.py", "--model", tiny_path, "--no-fq", "--max-samples", "6", "--max-new-tokens", "2",
                 "--out", second)
    e = json.load(open(second))
    assert [e["mia"][k]["auc"] for k in ("loss", "zlib", "min_k", "min_k_pp")] == [1.0] * 4 and e["privleak"] == -100


def test_no_mia_and_gradnorm(tiny_path, tmp_path, monkeypatch):
    out = tmp_path / "e.json"
    monkeypatch.setattr(eval_tofu, "holdout_rows", lambda *a: pytest.fail("holdout rows loaded"))
    r = run_main("eval_tofu.py", "--model", tiny_path, "--no-fq", "--no-mia", "--max-samples", "3",
                 "--max-new-tokens", "2", "--out", out)
    d = json.load(open(out))
    assert d["mia"] is d["privleak"] is d["summary"]["privleak"] is None and d["privleak_reference"] == "skipped (--no-mia)"
    assert row_cells(r.stdout)[6:] == ["n/a (skipped)", "n/a (skipped)"] and "MIA: skipped (--no-mia)" in r.stdout
    monkeypatch.undo()
    r = run_main("eval_tofu.py", "--model", tiny_path, "--no-fq", "--mia-gradnorm", "--max-samples", "3",
                 "--max-new-tokens", "2", "--out", out)
    g = json.load(open(out))["mia"]["gradnorm"]
    tok = common.load_tokenizer(tiny_path)
    model = common.load_model(tiny_path, frozen=True)
    rows = common.load_tofu("holdout05")[:3]
    assert g["holdout"] == pytest.approx(eval_tofu.gradnorm(model, tok, common.encode_rows(tok, QA, rows)), rel=1e-6)
    assert g["auc"] == 1.0 and "GradNorm 1.0000" in r.stdout


@pytest.mark.parametrize("flags,msg", [
    (["--mia-k", "0"], "--mia-k must be in (0, 1], got 0.0"),
    (["--mia-k", "1.5"], "--mia-k must be in (0, 1], got 1.5"),
    (["--no-mia", "--mia-gradnorm"], "--mia-gradnorm is one of the attacks that --no-mia skips"),
    ("no holdout", "holdout05' not found"),
])
def test_bad_input(flags, msg, tmp_path, tiny_path):
    if flags == "no holdout":  # a data folder without the holdout configs: the line says --no-mia skips them
        import fictitious
        (tmp_path / "d").mkdir()
        for name, rows in fictitious.generate().items():
            if not name.startswith("holdout"):
                (tmp_path / "d" / f"{name}.json").write_text("\n".join(json.dumps(r) for r in rows))
        flags = ["--data", str(tmp_path / "d")]
    out = tmp_path / "o" / "e.json"
    r = run_main("eval_tofu.py", "--model", tiny_path, *flags, "--out", out)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.parent.exists()
    if "--data" in flags:
        assert "--no-mia skips them" in r.stderr
