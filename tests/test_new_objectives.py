"""SimNPO, SatImp, IdkDPO and UNDIAL: each loss against its gradient derived by hand (float64, in the
per-token log-probabilities or the logits), its value computed by hand, micro-batch shares, and each
script for two steps, whose logged objective at step 1 is the loss of the original model computed here."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import idkdpo
import satimp
import simnpo
import undial
import wga
from conftest import run_main

NEW = ["simnpo", "satimp", "idkdpo", "undial"]


@pytest.fixture(scope="module")
def toy():
    """Per-token log-probs of 3 rows with 4, 2 and 3 answer tokens (float64), the original model's, and
    a second answer (the refusals) of 2, 3 and 1 tokens with its own."""
    g = torch.Generator().manual_seed(0)
    lp = lambda: -3 * torch.rand(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    idk_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    return dict(logp=lp(), ref=lp(), mask=mask, idk=lp(), idk_ref=lp(), idk_mask=idk_mask)


def grad(fn, x):
    """d fn(x) / dx by autograd, x a float64 leaf."""
    x = x.detach().clone().requires_grad_(True)
    fn(x)[0].backward()
    return x.grad


def rows(t, mask):
    """The masked entries of each row of t, as Python lists."""
    return [[v for v, m in zip(r.tolist(), mr.tolist()) if m] for r, mr in zip(t, mask)]


sigmoid = lambda x: 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- SimNPO

@pytest.mark.parametrize("beta,gamma", [(2.5, 0.0), (4.5, 1.0)])
def test_simnpo_by_hand(toy, beta, gamma):
    logp, mask = toy["logp"], toy["mask"]
    loss, stats = simnpo.simnpo_loss(logp, mask, beta, gamma, 3)
    means = [sum(r) / len(r) for r in rows(logp, mask)]  # (1/|y|) log p(y|x)
    want = sum(-(2 / beta) * math.log(sigmoid(-beta * a - gamma)) for a in means) / 3
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert stats["weight"] == pytest.approx(sum(2 * sigmoid(beta * a + gamma) for a in means) / 3, rel=1e-12)
    # dL/d log p_t = (2/N) sigmoid(beta a + gamma) / |y| on the answer tokens, 0 elsewhere
    want = torch.zeros_like(logp)
    for b, a in enumerate(means):
        want[b, mask[b]] = 2 / 3 * sigmoid(beta * a + gamma) / int(mask[b].sum())
    assert torch.allclose(grad(lambda x: simnpo.simnpo_loss(x, mask, beta, gamma, 3), logp), want, rtol=1e-12, atol=0)


def test_simnpo_equals_the_authors_code_with_delta_gamma_over_beta(toy):
    """The authors' code and open-unlearning: -(2/beta) log sigmoid(beta (NLL/|y| - delta)); delta = gamma/beta."""
    logp, mask = toy["logp"], toy["mask"]
    nll = -(logp * mask).sum(-1) / mask.sum(-1)
    for beta, gamma in ((2.5, 0.0), (2.5, 1.0), (4.5, 2.0)):
        theirs = (-2 / beta * F.logsigmoid(beta * (nll - gamma / beta))).mean()
        assert simnpo.simnpo_loss(logp, mask, beta, gamma, 3)[0].item() == pytest.approx(theirs.item(), rel=1e-12)


# ----------------------------------------------------------------------------- SatImp

@pytest.mark.parametrize("beta1,beta2", [(5.0, 0.1), (1.0, 1.0), (3.0, 0.0)])
def test_satimp_by_hand(toy, beta1, beta2):
    logp, mask = toy["logp"], toy["mask"]
    loss, stats = satimp.satimp_loss(logp, mask, beta1, beta2, 9)
    w = lambda lp: math.exp(lp) ** beta1 * (1 - math.exp(lp)) ** beta2
    tokens = [lp for r in rows(logp, mask) for lp in r]
    assert loss.item() == pytest.approx(sum(w(lp) * lp for lp in tokens) / 9, rel=1e-12)
    assert stats["weight"] == pytest.approx(sum(w(lp) for lp in tokens) / 9, rel=1e-12)
    # the weights are detached: dL/d log p_t = w_t / n_tok
    want = torch.tensor([[w(v) / 9 if m else 0.0 for v, m in zip(r.tolist(), mr.tolist())]
                         for r, mr in zip(logp, mask)], dtype=torch.float64)
    assert torch.allclose(grad(lambda x: satimp.satimp_loss(x, mask, beta1, beta2, 9), logp), want,
                          rtol=1e-12, atol=0)
    assert torch.allclose(stats["token_weight"][mask], torch.tensor([w(v) for v in tokens], dtype=torch.float64),
                          rtol=1e-12, atol=0)


def test_satimp_with_beta2_0_is_wga(toy):
    logp, mask = toy["logp"], toy["mask"]
    assert torch.equal(satimp.satimp_loss(logp, mask, 5.0, 0.0, 9)[0], wga.wga_loss(logp, mask, 5.0, 9)[0])


# ----------------------------------------------------------------------------- IdkDPO

@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_idkdpo_by_hand(toy, beta):
    t = toy
    args = lambda lp, idk: (lp, t["ref"], t["mask"], idk, t["idk_ref"], t["idk_mask"], beta, 3)
    loss, stats = idkdpo.idkdpo_loss(*args(t["logp"], t["idk"]))
    seq = lambda x, m: [sum(r) for r in rows(x, m)]
    win = [a - b for a, b in zip(seq(t["idk"], t["idk_mask"]), seq(t["idk_ref"], t["idk_mask"]))]
    lose = [a - b for a, b in zip(seq(t["logp"], t["mask"]), seq(t["ref"], t["mask"]))]
    margins = [beta * (w - l) for w, l in zip(win, lose)]
    assert loss.item() == pytest.approx(sum(-(2 / beta) * math.log(sigmoid(m)) for m in margins) / 3, rel=1e-12)
    assert stats["weight"] == pytest.approx(sum(2 * sigmoid(-m) for m in margins) / 3, rel=1e-12)
    # dL/d log p(y_f)_t = +(2/N) sigmoid(-margin), dL/d log p(y_idk)_t = -(2/N) sigmoid(-margin)
    for x, m, sign, fn in ((t["logp"], t["mask"], 1, lambda x: idkdpo.idkdpo_loss(*args(x, t["idk"]))),
                           (t["idk"], t["idk_mask"], -1, lambda x: idkdpo.idkdpo_loss(*args(t["logp"], x)))):
        want = torch.zeros_like(x)
        for b, mb in enumerate(margins):
            want[b, m[b]] = sign * 2 / 3 * sigmoid(-mb)
        assert torch.allclose(grad(fn, x), want, rtol=1e-12, atol=0)


def test_idkdpo_at_the_original_model(toy):
    """theta = theta_o: every margin is 0, the loss (2/beta) log 2 and the weight 1."""
    t = toy
    loss, stats = idkdpo.idkdpo_loss(t["ref"], t["ref"], t["mask"], t["idk_ref"], t["idk_ref"], t["idk_mask"], 0.1, 3)
    assert loss.item() == pytest.approx(20 * math.log(2), rel=1e-14) and stats["weight"] == 1.0


# ----------------------------------------------------------------------------- UNDIAL

@pytest.fixture(scope="module")
def toy_logits():
    """B 2 x T 5 x V 7 logits of the model and the original, labels with a prompt and padding."""
    g = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    z_ref = 2 * torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 0, 6], [-100, 5, 2, -100, -100]])
    return z, z_ref, labels


@pytest.mark.parametrize("beta", [1.0, 10.0])
def test_undial_by_hand(toy_logits, beta):
    z, z_ref, labels = toy_logits
    loss, stats = undial.undial_loss(z, z_ref, labels, beta, 5)
    # position t predicts labels[t + 1]: answer positions (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)
    answer = [(b, t, labels[b, t + 1].item()) for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    assert len(answer) == 5
    total, target_p, want = 0.0, 0.0, torch.zeros_like(z)
    for b, t, y in answer:
        adj = [z_ref[b, t, v].item() - (beta if v == y else 0) for v in range(7)]
        q = [math.exp(a) / sum(math.exp(c) for c in adj) for a in adj]
        p = [math.exp(a) / sum(math.exp(c) for c in z[b, t].tolist()) for a in z[b, t].tolist()]
        total += -sum(qv * math.log(pv) for qv, pv in zip(q, p))
        target_p += q[y]
        want[b, t] = torch.tensor([(pv - qv) / 5 for pv, qv in zip(p, q)], dtype=torch.float64)  # dH/dz = p - q
    assert loss.item() == pytest.approx(total / 5, rel=1e-12)
    assert stats["target_p"] == pytest.approx(target_p / 5, rel=1e-12)
    # the gradient in the logits, p_t - q_t at answer positions and 0 at the prompt, padding and last position
    assert torch.allclose(grad(lambda x: undial.undial_loss(x, z_ref, labels, beta, 5), z), want, rtol=1e-10,
                          atol=1e-15)


def test_undial_without_adjustment_is_stationary_at_the_original(toy_logits):
    """beta -> 0 and theta = theta_o: the target is the model itself, the gradient 0."""
    z, _, labels = toy_logits
    g = grad(lambda x: undial.undial_loss(x, z, labels, 1e-300, 5), z)
    assert g.abs().max() < 1e-15


# ----------------------------------------------------------------------------- all four

def test_micro_batches_add_up_to_the_batch(toy, toy_logits):
    t, parts = toy, [slice(0, 1), slice(1, 3)]
    calls = [lambda s: simnpo.simnpo_loss(t["logp"][s], t["mask"][s], 2.5, 1.0, 3),
             lambda s: satimp.satimp_loss(t["logp"][s], t["mask"][s], 5.0, 0.1, 9),
             lambda s: idkdpo.idkdpo_loss(t["logp"][s], t["ref"][s], t["mask"][s], t["idk"][s], t["idk_ref"][s],
                                          t["idk_mask"][s], 0.1, 3)]
    z, z_ref, labels = toy_logits
    calls.append(lambda s: undial.undial_loss(z[s], z_ref[s], labels[s], 10.0, 5))
    for fn in calls:
        full = fn(slice(None))[0].item()
        assert sum(fn(s)[0].item() for s in parts) == pytest.approx(full, rel=1e-12)


@pytest.mark.parametrize("method", NEW)
def test_help(method):
    r = run_main(f"{method}.py", "--help")
    assert r.returncode == 0 and "--reg {none,gd,kl,rr}" in r.stdout and "--lora-r" in r.stdout
    assert "--geffect-order" in r.stdout and "--grad-accum" in r.stdout


@pytest.fixture(scope="module")
def forget01(tiny_path):
    """The tiny model's answer-token logits and log-probs on all of forget01, at theta_o, in float32 as the
    scripts compute them (SatImp's 1 - p of a memorised token is float32's, to a few percent of itself)."""
    model = common.load_model(tiny_path, frozen=True)
    tokenizer = common.load_tokenizer(tiny_path)
    batch = common.collate(common.encode_rows(tokenizer, common.QA_TEMPLATE, common.split_data("forget01")["forget"]),
                           tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp, mask = common.token_logprobs(logits, batch["labels"])
    return logits, logp, mask, batch["labels"]


RUNS = {  # each script with another regularizer (and UNDIAL through LoRA adapters), forget01, 2 steps
    "simnpo": ["--reg", "gd"],
    "satimp": ["--reg", "rr", "--log-token-weights"],
    "idkdpo": ["--reg", "none"],
    "undial": ["--reg", "kl", "--lora-r", "2"],
}


def expected_objective(method, forget01):
    """The method's loss of the original model on all 10 forget01 rows (step 1's batch, in another order:
    every loss is a sum over rows or tokens), computed here from its definition."""
    logits, logp, mask, labels = forget01
    lp = rows(logp.double(), mask)
    if method == "simnpo":  # beta 2.5, gamma 0
        return sum(2 / 2.5 * math.log(1 + math.exp(2.5 * sum(r) / len(r))) for r in lp) / 10
    if method == "satimp":  # beta1 5, beta2 0.1
        tok = [v for r in lp for v in r]
        return sum(math.exp(v) ** 5 * (1 - math.exp(v)) ** 0.1 * v for v in tok) / len(tok)
    if method == "idkdpo":  # theta = theta_o: margin 0
        return 2 / 0.1 * math.log(2)
    total, n = 0.0, 0  # UNDIAL, beta 10, the original model as its own reference
    for b, t in mask.nonzero().tolist():
        adj = logits[b, t].double()
        adj[labels[b, t + 1]] -= 10
        total += -(adj.softmax(-1) * logits[b, t].double().log_softmax(-1)).sum().item()
        n += 1
    return total / n


@pytest.mark.parametrize("method", NEW)
def test_two_steps(method, forget01, tmp_path):
    out = tmp_path / "run"
    r = run_main(f"{method}.py", "--split", "forget01", "--max-steps", "2", "--grad-accum", "2", "--no-eval",
                 "--out", out, *RUNS[method])
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [x["step"] for x in log] == [1, 2]
    for x in log:
        assert all(math.isfinite(x[k]) for k in ("loss", "objective", "reg", "forget_nll", "retain_nll", "lr"))
    # log.jsonl's objective is the loss at the step's weights, before the step: at step 1, theta_o
    assert log[0]["objective"] == pytest.approx(expected_objective(method, forget01), rel=1e-4)
    assert log[1]["objective"] != log[0]["objective"]
    assert (log[-1]["reg"] == 0) == (method == "idkdpo")  # --reg none
    args = json.load(open(out / "args.json"))
    assert args["lr"] == {"idkdpo": 3e-3, "undial": 3e-3}.get(method, 1e-3)  # undial: LoRA's tiny lr
    if method == "idkdpo":
        assert log[0]["weight"] == pytest.approx(1.0, abs=1e-4)
    if method == "satimp":  # the token weights the loss used, one row per forget row of each step
        assert len(open(out / "token_weights.jsonl").read().splitlines()) == 20


@pytest.mark.parametrize("method,argv,msg", [
    ("simnpo", ["--beta", "0"], "--beta must be positive and finite, got 0.0"),
    ("simnpo", ["--gamma", "nan"], "--gamma must be a finite number, got nan"),
    ("satimp", ["--beta2", "-1"], "--beta2 must be >= 0 and finite, got -1.0"),
    ("idkdpo", ["--beta", "-0.1"], "--beta must be positive and finite, got -0.1"),
    ("undial", ["--beta", "inf"], "--beta must be positive and finite, got inf"),
])
def test_bad_flags(method, argv, msg, tmp_path):
    r = run_main(f"{method}.py", "--out", str(tmp_path / "x"), *argv)
    assert r.returncode == 2 and r.stderr.strip() == f"{method}.py: error: {msg}", r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()
