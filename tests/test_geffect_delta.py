"""What the real step does to the risks (geffect.jsonl's "delta"): with plain SGD the update's
prediction is the paper's -lr*e, the actual change is R after minus R before, and the first- and
second-order predictions are Taylor expansions of the right orders."""
import argparse
import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
import ga
import geffect
from test_geffect import risk, small_model


def probed_step(tmp_path, tokenizer, lr, order=1, optim="sgd", max_norm=0.0, reg="gd", keep=None):
    """One probed GA step on a float64 model: (geffect row, R before and after for D_u and D_r); `keep`, a
    dict, receives the stepped model and the two sets."""
    model = small_model(tokenizer)
    args = argparse.Namespace(geffect_every=1, geffect_retain=6, geffect_pointwise=False, geffect_dr="heldout",
                              geffect_order=order, template=common.QA_TEMPLATE, batch_size=4, grad_accum=2, seed=0)
    data = common.split_data("forget05", "builtin")
    forget = common.encode_rows(tokenizer, args.template, data["forget"])
    retain = common.encode_rows(tokenizer, args.template, data["retain_train"])
    probe = geffect.Probe(args, model, tokenizer, data["retain_eval"], tmp_path)
    optimizer = common.make_optimizer(model.parameters(), optim, lr)
    micro, n = next(common.unlearn_batches(forget, retain, args, 1, tokenizer.pad_token_id, "cpu"))
    sets = dict(unlearn=[f for f, _ in micro], retain=probe.d_r)
    before = {d: risk(model, b) for d, b in sets.items()}
    for forget_batch, retain_batch in micro:
        logp, mask = common.answer_logprobs(model, forget_batch)
        loss, _ = ga.ga_loss(logp, mask, n["forget_tok"])
        r, _ = common.regularizer(reg, model, None, retain_batch, n["retain_tok"])
        probe.backward(0.3 * loss, r, logp, mask, forget_batch)
    probe.step(optimizer, max_norm, 1)
    after = {d: risk(model, b) for d, b in sets.items()}
    probe.close()
    if keep is not None:
        keep.update(model=model, sets=sets)
    (row,) = [json.loads(x) for x in open(tmp_path / "geffect.jsonl")]
    return row, before, after


def test_sgd_update_is_the_papers_prediction(tiny_tokenizer, tmp_path):
    row, _, _ = probed_step(tmp_path, tiny_tokenizer, lr=1e-2)
    assert row["lr"] == 1e-2
    for d in ("unlearn", "retain"):
        rec = row["delta"][d]
        assert rec["gradient"] == pytest.approx(-1e-2 * row[d]["total"], rel=1e-12)
        assert rec["update"] == pytest.approx(rec["gradient"], rel=1e-9)  # plain SGD: the step is -lr grad L
        assert sum(rec["groups"]["update"].values()) == pytest.approx(rec["update"], rel=1e-9)
        assert "second_order" not in rec


def test_clipped_adamw_update_is_not_the_papers(tiny_tokenizer, tmp_path):
    row, _, _ = probed_step(tmp_path, tiny_tokenizer, lr=1e-3, optim="adamw", max_norm=1.0)
    u, g = row["delta"]["unlearn"]["update"], row["delta"]["unlearn"]["gradient"]
    assert abs(u - g) > 0.1 * abs(g)  # AdamW's first step is sign-like: not -lr grad L


def test_actual_is_r_after_minus_r_before(tiny_tokenizer, tmp_path):
    row, before, after = probed_step(tmp_path, tiny_tokenizer, lr=1e-2, optim="adamw", max_norm=1.0)
    for d in ("unlearn", "retain"):
        assert row["delta"][d]["risk"] == pytest.approx(before[d], rel=1e-12)
        assert row["delta"][d]["actual"] == pytest.approx(after[d] - before[d], rel=1e-9, abs=1e-13)
    assert row["delta"]["unlearn"]["actual"] > 0  # GA raises the forget risk


def test_taylor_orders(tiny_tokenizer, tmp_path):
    """Over SGD steps of size lr, |update - actual| ~ lr^2 and |second_order - actual| ~ lr^3:
    the slopes of a log-log fit."""
    lrs = [1e-2, 5e-3, 2.5e-3, 1.25e-3]
    err = {k: {d: [] for d in ("unlearn", "retain")} for k in ("update", "second_order")}
    for i, lr in enumerate(lrs):
        (tmp_path / str(i)).mkdir()
        row, _, _ = probed_step(tmp_path / str(i), tiny_tokenizer, lr=lr, order=2)
        for d in ("unlearn", "retain"):
            rec = row["delta"][d]
            for k in err:
                err[k][d].append(abs(rec[k] - rec["actual"]))
            assert sum(rec["groups"]["second_order"].values()) == pytest.approx(rec["second_order"], rel=1e-9)
    xs = [math.log(lr) for lr in lrs]
    for k, want in (("update", 2), ("second_order", 3)):
        for d in ("unlearn", "retain"):
            ys = [math.log(e) for e in err[k][d]]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            assert slope == pytest.approx(want, abs=0.25), (k, d, err[k][d])


def test_second_order_term_is_the_hessian_at_theta_t(tiny_tokenizer, tmp_path):
    """The logged 1/2 d^T H d (second_order - update, H averaged along the step) against the Taylor term
    with H at theta_t, by a Hessian-vector product (double backward): equal up to O(|d|^3), so their
    relative gap shrinks in proportion to the step."""
    gaps = []
    for i, lr in enumerate((4e-3, 1e-3, 2.5e-4)):
        (tmp_path / str(i)).mkdir()
        keep = {}
        row, _, _ = probed_step(tmp_path / str(i), tiny_tokenizer, lr=lr, order=2, keep=keep)
        theta_t = small_model(tiny_tokenizer)  # the same seed: the weights the step started from
        params = list(theta_t.parameters())
        d = [a.detach() - b.detach() for a, b in zip(keep["model"].parameters(), params)]
        for name, batches in keep["sets"].items():
            with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
                lps = [common.answer_logprobs(theta_t, b) for b in batches]
                r = -sum((lp * m).sum() for lp, m in lps) / sum(m.sum() for _, m in lps)
                g = torch.autograd.grad(r, params, create_graph=True)
                hd = torch.autograd.grad(sum((gi * di).sum() for gi, di in zip(g, d)), params)
            hvp_term = 0.5 * sum((h * di).sum() for h, di in zip(hd, d)).item()
            logged = row["delta"][name]["second_order"] - row["delta"][name]["update"]
            gaps.append((name, lr, abs(logged - hvp_term) / abs(hvp_term)))
    for name in ("unlearn", "retain"):
        gap = [g for nm, _, g in gaps if nm == name]
        for big, small in zip(gap, gap[1:]):  # each step 4x smaller: the gap 4x smaller
            assert 3 < big / small < 5, gaps
        assert gap[-1] < 0.05, gaps


@pytest.mark.parametrize("extra", [[], ["--geffect-every", "2"], ["--geffect-dr", "step"]])
def test_a_method_run_logs_delta_every_measured_step(tmp_path, tiny_path, extra):
    """Order 1 takes R(D_r) after a step from the next step's G-effect when every step is measured with
    the held-out D_r, else from a forward of its own; either way what order 2 measures directly."""
    import wga
    rows = {}
    for order in (2, 1):
        out = tmp_path / f"order{order}"
        wga.main(["--split", "forget01", "--max-steps", "3", "--no-eval", "--geffect-every", "1",
                  "--geffect-order", str(order), "--out", str(out), *extra])
        rows[order] = [json.loads(x) for x in open(out / "geffect.jsonl")]
    steps = [1, 3] if extra[:1] == ["--geffect-every"] else [1, 2, 3]
    assert [r["step"] for r in rows[2]] == [r["step"] for r in rows[1]] == steps
    for r in rows[2]:
        for d in ("unlearn", "retain"):
            assert set(r["delta"][d]) >= {"actual", "gradient", "update", "second_order", "risk", "groups"}
    for r1, r2 in zip(rows[1], rows[2]):  # the same training: the same changes, however R after is had
        for d in ("unlearn", "retain"):
            assert "second_order" not in r1["delta"][d]
            for k in ("actual", "update", "risk"):
                assert r1["delta"][d][k] == pytest.approx(r2["delta"][d][k], rel=1e-5, abs=1e-9), (d, k)
    if extra:
        return
    # forget01's 10 rows are every step's whole batch, and D_r is the same held-out rows: what one step
    # measured after itself is what the next measures before itself
    for a, b in zip(rows[2], rows[2][1:]):
        for d in ("unlearn", "retain"):
            assert b["delta"][d]["risk"] == pytest.approx(a["delta"][d]["risk"] + a["delta"][d]["actual"], rel=1e-5)
