"""The G-effect against finite differences, its groups, terms and point-wise values."""
import argparse
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import common
import ga
import geffect
import npo
from conftest import run_main


def small_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).double()


def measured_step(tmp_path, tokenizer, method, reg, pointwise=False, dr="heldout"):
    """One probed step of `method` on a float64 model: (model, geffect row, forget and D_r batches, n)."""
    model = small_model(tokenizer)
    ref = small_model(tokenizer)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref.requires_grad_(False)
    args = argparse.Namespace(geffect_every=1, geffect_retain=6, geffect_pointwise=pointwise, geffect_dr=dr, template=common.QA_TEMPLATE,
                              batch_size=4, grad_accum=2, seed=0, beta=0.5)
    data = common.split_data("forget05", "builtin")
    forget = common.encode_rows(tokenizer, args.template, data["forget"])
    retain = common.encode_rows(tokenizer, args.template, data["retain_train"])
    if method == "npo":
        common.add_reference_logprobs(ref, forget, tokenizer.pad_token_id, "cpu")
    probe = geffect.Probe(args, model, tokenizer, data["retain_eval"], tmp_path)
    micro, n = next(common.unlearn_batches(forget, retain, args, 1, tokenizer.pad_token_id, "cpu"))
    for forget_batch, retain_batch in micro:
        logp, mask = common.answer_logprobs(model, forget_batch)
        if method == "ga":
            loss, _ = ga.ga_loss(logp, mask, n["forget_tok"])
        else:
            loss, _ = npo.npo_loss(logp, forget_batch["ref_logp"], mask, args.beta, n["forget_rows"])
        r, _ = common.regularizer(reg, model, ref, retain_batch, n["retain_tok"], layer=2)
        probe.backward(loss, r, logp, mask, forget_batch)
    probe.close()
    row = json.loads(open(tmp_path / "geffect.jsonl").read())
    return model, row, [f for f, _ in micro], probe.d_r if dr == "heldout" else [r for _, r in micro], n


def risk(model, batches):
    with torch.no_grad():
        lps = [common.answer_logprobs(model, b) for b in batches]
    return -sum((lp * m).sum() for lp, m in lps).item() / sum(m.sum() for _, m in lps).item()


def sgd_change(model, batches, groups, eps):
    """How R changes per unit of step along -g, g = .grad restricted to `groups`: an SGD step of size
    eps (R(theta - eps g) - R(theta)) / -eps, measured as a central difference so that the
    curvature term cancels: (R(theta + eps g) - R(theta - eps g)) / (2 eps)."""
    params = [p for _, p, grp, _ in geffect.param_groups(model) if grp in groups and p.grad is not None]
    r = []
    with torch.no_grad():
        for sign in (-1, 2, -1):  # theta - eps g, theta + eps g, back to theta
            for p in params:
                p.add_(sign * eps * p.grad)
            r.append(risk(model, batches))
    return (r[1] - r[0]) / (2 * eps)


@pytest.mark.parametrize("method,reg,dr", [("ga", "none", "heldout"), ("ga", "kl", "heldout"),
                                           ("npo", "none", "heldout"), ("npo", "gd", "heldout"), ("ga", "kl", "step")])
def test_geffect_matches_an_sgd_step(method, reg, dr, tiny_tokenizer, tmp_path):
    model, row, forget_batches, d_r, _ = measured_step(tmp_path, tiny_tokenizer, method, reg, dr=dr)
    for key, batches in (("unlearn", forget_batches), ("retain", d_r)):
        for groups in (geffect.GROUPS, ("embed",), ("shallow",), ("middle",), ("deep",), ("lm",)):
            want = row[key]["total"] if len(groups) > 1 else row[key][groups[0]]
            eps = 1e-3 / max(abs(want), 1e-3)
            got = sgd_change(model, batches, groups, eps)
            assert got == pytest.approx(want, rel=0.02, abs=1e-6), (key, groups, got, want)


def test_groups_layers_and_terms_add_up(tiny_tokenizer, tmp_path):
    model, row, *_ = measured_step(tmp_path, tiny_tokenizer, "ga", "kl")
    for key in ("unlearn", "retain"):
        r = row[key]
        assert sum(r[g] for g in geffect.GROUPS) == pytest.approx(r["total"], rel=1e-9)
        assert sum(r["layers"]) == pytest.approx(r["shallow"] + r["middle"] + r["deep"], rel=1e-9)
        assert len(r["layers"]) == 3 and r["layers"][0] == pytest.approx(r["shallow"])
        terms = row["terms"]
        assert terms["objective"][key] + terms["reg"][key] == pytest.approx(r["total"], rel=1e-9)
        assert terms["reg"][key] != 0 and terms["objective"][key] != 0
    assert row["step"] == 1


def test_every_parameter_in_exactly_one_group(tiny_tokenizer):
    model = small_model(tiny_tokenizer)
    groups = geffect.param_groups(model)
    assert len(groups) == len(list(model.parameters()))
    assert {g for _, _, g, _ in groups} == set(geffect.GROUPS)
    deep = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=32,
                                        num_attention_heads=2, num_key_value_heads=2))
    thirds = {}
    for _, _, g, layer in geffect.param_groups(deep):
        if layer is not None:
            thirds.setdefault(g, set()).add(layer)
    assert thirds == dict(shallow=set(range(11)), middle=set(range(11, 22)), deep=set(range(22, 32)))


def test_pointwise_recovers_the_objective(tiny_tokenizer, tmp_path):
    """GA's e_u is the token-mean of the samples' PG-effects; NPO's is their w_npo-weighted mean (eq. 5)."""
    for method in ("ga", "npo"):
        d = tmp_path / method
        d.mkdir()
        _, row, _, _, n = measured_step(d, tiny_tokenizer, method, "none", pointwise=True)
        pw = row["pointwise"]
        assert len(pw) == n["forget_rows"]
        for key in ("unlearn", "retain"):
            if method == "ga":
                want = sum(p[f"pg_{key}"] for p in pw) / n["forget_tok"]
            else:
                want = sum(p["w_npo"] * p[f"pg_{key}"] for p in pw) / n["forget_rows"]
            assert want == pytest.approx(row[key]["total"], rel=1e-6)


def test_probe_does_not_change_training(tiny_path, tmp_path):
    logs = []
    for extra in ([], ["--geffect-every", "1", "--geffect-pointwise", "--geffect-order", "2"]):
        out = tmp_path / ("probe" if extra else "plain")
        r = run_main("npo.py", "--max-steps", "3", "--batch-size", "8", "--grad-accum", "2", "--no-eval", "--out", out,
                     *extra)
        assert r.returncode == 0, r.stderr
        logs.append([json.loads(line) for line in open(out / "log.jsonl")])
    keys = ("loss", "objective", "reg", "forget_nll", "retain_nll", "grad_norm")
    # equal up to float summation order: the probe adds the regularizer's gradient after the objective's
    for a, b in zip(logs[0], logs[1]):
        assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-3, abs=1e-9)
    assert logs[0][0]["loss"] == logs[1][0]["loss"] and len(logs[0]) == len(logs[1]) == 3
    rows = [json.loads(line) for line in open(tmp_path / "probe" / "geffect.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(len(r["pointwise"]) == 8 for r in rows)
    assert set(rows[0]) == {"step", "unlearn", "retain", "terms", "pointwise", "lr", "delta"}


def test_heldout_d_r_spreads_over_every_author():
    """D_r's default rows: one per author of the 400 held-out rows (10 per author in the built-in
    set, which asks each author the same questions in the same order), every question position 4 times."""
    rows = geffect.spread(40)
    assert len(set(rows)) == 40 and rows == sorted(rows) and 0 <= rows[0] and rows[-1] < common.N_EVAL
    assert [r // 10 for r in rows] == list(range(40))  # every built-in author (10 rows each) once
    assert sorted(r % 10 for r in rows) == sorted(list(range(10)) * 4)  # every question position 4 times
    for n in (1, 7, 32, 64, 399, 400):
        rows = geffect.spread(n)
        assert len(set(rows)) == n and all(int(i * 400 / n) <= r < (i + 1) * 400 / n for i, r in enumerate(rows))

