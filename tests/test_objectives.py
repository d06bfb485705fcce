"""The objectives against their closed-form gradients, the regularizers, and every script end to end."""
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import common
import ga
import npo
import rmu
import tnpo
import wga
import wtnpo
from conftest import run_main

METHODS = ["ga", "wga", "npo", "tnpo", "wtnpo", "po", "rmu"]


@pytest.fixture(scope="module")
def setup():
    """A small float64 Llama, a perturbed copy as the original model, and a padded batch."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).double()
    ref = LlamaForCausalLM(cfg).double()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.requires_grad_(False)
    ids = torch.randint(3, 23, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[1, 7:] = -100  # padding of a shorter row
    attn = (labels != -100).long()
    attn[:, :4] = 1
    batch = dict(input_ids=ids, labels=labels, attention_mask=attn)
    with torch.no_grad():
        ref_logp, _ = common.answer_logprobs(ref, batch)
    batch["ref_logp"] = ref_logp
    return model, ref, batch


def close(a, b):
    """Equal up to the float32 steps inside the float64 model (Llama's RMSNorm computes in float32)."""
    return (a - b).abs().max() <= 1e-6 * b.abs().max()


def flat_grad(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    return torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if p.grad is None else p.grad.flatten().clone()
                      for p in model.parameters()])


def token_grads(model, batch):
    """Gradient of every answer token's log-probability, one by one: {(b, t): grad}, and logp."""
    logp, mask = common.answer_logprobs(model, batch)
    return {(b, t): flat_grad(model, logp[b, t]) for b, t in mask.nonzero().tolist()}, logp.detach(), mask


def test_ga_gradient(setup):
    model, _, batch = setup
    g, logp, mask = token_grads(model, batch)
    n = int(mask.sum())
    loss, stats = ga.ga_loss(*common.answer_logprobs(model, batch), n)
    want = sum(g.values()) / n  # mean grad log p of the answer tokens (minimised)
    assert close(flat_grad(model, loss), want)
    assert stats["inv_conf"] == pytest.approx((1 / logp.exp())[mask].mean().item())


@pytest.mark.parametrize("alpha", [0.0, 1.0, 5.0])
def test_wga_gradient(setup, alpha):
    model, _, batch = setup
    g, logp, mask = token_grads(model, batch)
    n = int(mask.sum())
    loss, stats = wga.wga_loss(*common.answer_logprobs(model, batch), alpha, n)
    want = sum(logp[k].exp() ** alpha * v for k, v in g.items()) / n  # eq. 2: weights p^alpha
    assert close(flat_grad(model, loss), want)
    assert stats["weight"] == pytest.approx((logp.exp() ** alpha)[mask].mean().item())


def test_wga_with_alpha_0_is_ga(setup):
    model, _, batch = setup
    lp, mask = common.answer_logprobs(model, batch)
    assert torch.equal(wga.wga_loss(lp, mask, 0.0, 7)[0], ga.ga_loss(lp, mask, 7)[0])


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_npo_gradient(setup, beta):
    model, ref, batch = setup
    g, logp, mask = token_grads(model, batch)
    lp, m = common.answer_logprobs(model, batch)
    loss, stats = npo.npo_loss(lp, batch["ref_logp"], m, beta, 3)
    want, weights = 0, []
    for b in range(3):  # eq. 4: E[w_npo grad log p(s)], w_npo = 2 p^b / (p^b + p_o^b) of the whole answer
        p, p_o = logp[b][mask[b]].sum().exp(), batch["ref_logp"][b][mask[b]].sum().exp()
        w = 2 * p ** beta / (p ** beta + p_o ** beta)
        weights.append(w.item())
        want = want + w * sum(v for (bb, _), v in g.items() if bb == b)
    assert close(flat_grad(model, loss), want / 3)
    assert stats["weight"] == pytest.approx(sum(weights) / 3)
    # the loss itself, eq. 3
    val = sum(math.log(1 + math.exp(beta * ((logp[b] - batch["ref_logp"][b])[mask[b]].sum().item())))
              for b in range(3)) * 2 / beta / 3
    assert loss.item() == pytest.approx(val)


@pytest.mark.parametrize("alpha,beta", [(0.0, 4.0), (1.5, 5.0)])
def test_tnpo_and_wtnpo_gradients(setup, alpha, beta):
    model, ref, batch = setup
    g, logp, mask = token_grads(model, batch)
    n = int(mask.sum())
    lp, m = common.answer_logprobs(model, batch)
    p, p_o = logp.exp(), batch["ref_logp"].exp()
    w_tnpo = 2 * p ** beta / (p ** beta + p_o ** beta)  # eq. 6
    loss, _ = wtnpo.wtnpo_loss(lp, batch["ref_logp"], m, alpha, beta, n)
    want = sum(p[k] ** alpha * w_tnpo[k] * v for k, v in g.items()) / n
    assert close(flat_grad(model, loss), want)
    if alpha == 0:  # WTNPO with alpha = 0 is TNPO
        assert torch.allclose(tnpo.tnpo_loss(lp, batch["ref_logp"], m, beta, n)[0], loss, atol=0, rtol=1e-15)


def test_weights_are_one_at_the_original_model(setup):
    model, _, batch = setup
    lp, mask = common.answer_logprobs(model, batch)
    own = lp.detach()  # theta = theta_o
    assert npo.npo_loss(lp, own, mask, 0.5, 3)[1]["weight"] == pytest.approx(1.0)
    assert tnpo.tnpo_loss(lp, own, mask, 4.0, int(mask.sum()))[1]["weight"] == pytest.approx(1.0)


def test_rmu_loss_by_hand(setup):
    model, _, batch = setup
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    _, mask = common.token_logprobs(out.logits, batch["labels"])
    u = torch.rand(16, dtype=torch.float64)
    loss, _ = rmu.rmu_loss(out.hidden_states[1], mask, u, 2.0, int(mask.sum()))
    h = out.hidden_states[1]
    want = [((h[b, t] - 2 * u) ** 2).mean() for b, t in mask.nonzero().tolist()]  # state at t predicts t+1
    assert loss.item() == pytest.approx((sum(want) / len(want)).item())  # mean over d = 16, as the original RMU
    # closed-form gradient in the hidden state: 2 (h - c u) / (d n_tok) at answer positions, 0 elsewhere
    leaf = h.detach().requires_grad_(True)
    rmu.rmu_loss(leaf, mask, u, 2.0, int(mask.sum()))[0].backward()
    grad = torch.zeros_like(h)
    grad[:, :-1] = 2 * (h[:, :-1] - 2 * u) / (16 * mask.sum()) * mask[..., None]
    assert torch.allclose(leaf.grad, grad.detach(), atol=1e-12)


def test_micro_batches_add_up_to_the_batch(setup):
    """Every loss normalises by the whole step, so micro-batch shares sum to the full-batch loss."""
    model, _, batch = setup
    lp, mask = common.answer_logprobs(model, batch)
    n_tok, n_rows = int(mask.sum()), 3
    parts = [slice(0, 1), slice(1, 3)]
    for fn, args in [(ga.ga_loss, ()), (wga.wga_loss, (5.0,))]:
        full = fn(lp, mask, *args, n_tok)[0]
        assert sum(fn(lp[s], mask[s], *args, n_tok)[0] for s in parts).item() == pytest.approx(full.item())
    full = npo.npo_loss(lp, batch["ref_logp"], mask, 0.5, n_rows)[0]
    split = sum(npo.npo_loss(lp[s], batch["ref_logp"][s], mask[s], 0.5, n_rows)[0] for s in parts)
    assert split.item() == pytest.approx(full.item())


# ----------------------------------------------------------------------------- regularizers

def test_regularizers(setup):
    model, ref, batch = setup
    n = int((batch["labels"][:, 1:] != -100).sum())
    same = LlamaForCausalLM(model.config).double()
    same.load_state_dict(model.state_dict())
    same.requires_grad_(False)
    for reg in ("kl", "rr"):  # zero at theta = theta_o, positive away from it
        assert common.regularizer(reg, model, same, batch, n, layer=1)[0].item() == pytest.approx(0, abs=1e-20)
        assert common.regularizer(reg, model, ref, batch, n, layer=1)[0].item() > 1e-6
    gd, nll = common.regularizer("gd", model, ref, batch, n)
    lp, mask = common.answer_logprobs(model, batch)
    assert gd.item() == pytest.approx(-lp[mask].mean().item()) and nll == pytest.approx(gd.item())
    zero, nll = common.regularizer("none", model, ref, batch, n, measure=True)
    assert zero.item() == 0 and nll == pytest.approx(gd.item())
    # KL(p_o || p) by hand at one answer position, and the mean over answer tokens only
    kl, _ = common.regularizer("kl", model, ref, batch, n)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    q, q_o = model(**inputs).logits.softmax(-1), ref(**inputs).logits.softmax(-1)
    terms = [(q_o[b, t] * (q_o[b, t] / q[b, t]).log()).sum() for b, t in mask.nonzero().tolist()]
    assert kl.item() == pytest.approx((sum(terms) / len(terms)).item())
    # RR: the squared distance of hidden state 1 averaged over d = 16 (MSE) and over answer positions
    rr, _ = common.regularizer("rr", model, ref, batch, n, layer=1)
    h, h_o = (m(**inputs, output_hidden_states=True).hidden_states[1] for m in (model, ref))
    terms = [((h[b, t] - h_o[b, t]) ** 2).mean() for b, t in mask.nonzero().tolist()]
    assert rr.item() == pytest.approx((sum(terms) / len(terms)).item())


@pytest.mark.parametrize("reg", ["gd", "kl", "rr"])
def test_regularizer_gradient_is_masked_to_answer_tokens(setup, reg):
    """Changing the tokens after the last answer token, or the prompt's labels, changes nothing."""
    model, ref, batch = setup
    n = int((batch["labels"][:, 1:] != -100).sum())
    loss = common.regularizer(reg, model, ref, batch, n, layer=1)[0]
    g1 = flat_grad(model, loss)
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][1, 8] = 5  # a padding position of row 1 (attended to, but its label is -100)
    loss2 = common.regularizer(reg, model, ref, other, n, layer=1)[0]
    assert close(g1, flat_grad(model, loss2))


# ----------------------------------------------------------------------------- the scripts

@pytest.mark.parametrize("method", METHODS)
def test_help(method):
    r = run_main(f"{method}.py", "--help")
    assert r.returncode == 0 and "--reg {none,gd,kl,rr}" in r.stdout and "--log-every" in r.stdout


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reg", ["none", "gd", "kl", "rr"])
def test_two_steps(method, reg, tiny_path, tmp_path, capsys):
    """Each script with each regularizer, two steps, run in this process through its main() (the
    command line itself is exercised by the subprocess tests: bad input, faults, reproducibility)."""
    import importlib
    out = tmp_path / "run"
    importlib.import_module(method).main(["--reg", reg, "--max-steps", "2", "--batch-size", "4", "--grad-accum", "2",
                                          "--max-samples", "8", "--out", str(out)])
    stdout = capsys.readouterr().out
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [x["step"] for x in log] == [1, 2]
    for x in log:
        assert all(math.isfinite(x[k]) for k in ("loss", "objective", "reg", "forget_nll", "retain_nll", "lr"))
    assert (log[-1]["reg"] == 0) == (reg == "none")  # KL and RR are 0 at step 1, where theta = theta_o
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.load(open(out / "args.json"))["reg"] == reg
    summary = json.load(open(out / "summary.json"))  # ES-exact before -> after, also printed
    assert summary["es_before"]["forget"] == 1.0 and 0 <= summary["es_after"]["retain"] <= 1
    assert f"ES-exact forget {summary['es_before']['forget']:.4f} -> {summary['es_after']['forget']:.4f}" in stdout


def test_max_samples_takes_the_es_on_the_first_rows(tiny_path, tmp_path):
    """--max-samples 3: the ES before and after unlearning on the first 3 forget and held-out retain rows."""
    import common
    import eval_tofu
    r = run_main("ga.py", "--max-steps", "2", "--lr", "0.01", "--max-samples", "3", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    after = json.load(open(tmp_path / "run" / "summary.json"))["es_after"]
    model, tok = common.load_model(str(tmp_path / "run"), frozen=True), common.load_tokenizer(tiny_path)
    d = common.split_data("forget05")
    for key, rows in (("forget", d["forget"]), ("retain", d["retain_eval"])):
        es = eval_tofu.es_exact(model, tok, rows[:3], common.QA_TEMPLATE)
        assert after[key] == sum(es) / 3, key


@pytest.mark.parametrize("method,argv,msg", [
    ("tnpo", ["--beta", "0"], "--beta must be positive"),
    ("wtnpo", ["--alpha", "-2"], "--alpha must be >= 0"),
    ("rmu", ["--layer", "7"], "--layer 7 is out of range"),
    ("ga", ["--reg", "rr", "--rr-layer", "-1"], "--rr-layer -1 is out of range"),
    ("wga", ["--geffect-every", "-1"], "--geffect-every must be >= 0"),
])
def test_bad_flags(method, argv, msg, tiny_path, tmp_path):
    r = run_main(f"{method}.py", "--out", str(tmp_path / "x"), *argv)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()


def test_existing_model_is_kept_unless_overwrite(tiny_path, tmp_path):
    out = tmp_path / "run"
    assert run_main("ga.py", "--max-steps", "1", "--no-eval", "--out", str(out)).returncode == 0
    before = (out / "model.safetensors").read_bytes()
    r = run_main("ga.py", "--max-steps", "1", "--lr", "0.01", "--no-eval", "--out", str(out))
    assert r.returncode == 2 and "holds a ga.py run already" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (out / "model.safetensors").read_bytes() == before and not (tmp_path / "run.tmp").exists()
    r = run_main("ga.py", "--max-steps", "1", "--lr", "0.01", "--no-eval", "--out", str(out), "--overwrite")
    assert r.returncode == 0 and (out / "model.safetensors").read_bytes() != before
