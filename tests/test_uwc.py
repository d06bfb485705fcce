"""UWC: exact mixing at the ends, the search on constructed cases, and the command end to end."""
import json
import math

import pytest
import torch

import uwc
from conftest import run_main, run_script


@pytest.fixture(scope="module")
def two_models(tiny_path, tmp_path_factory):
    """The tiny target model and a 2-step GA run from it (an 'unlearned' model)."""
    out = tmp_path_factory.mktemp("uwc") / "ga"
    r = run_main("ga.py", "--max-steps", "2", "--lr", "0.01", "--no-eval", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return tiny_path, str(out)


def state(path):
    from safetensors.torch import load_file
    return load_file(f"{path}/model.safetensors")


def test_mixing_ends_are_exact_and_the_middle_is_linear(two_models):
    import common
    original, unlearned = two_models
    model = common.load_model(unlearned, frozen=True)
    o_files, u_files = uwc.safetensors_files(original), uwc.safetensors_files(unlearned)
    o, u = state(original), state(unlearned)
    assert any(not torch.equal(o[k], u[k]) for k in o)
    for lam, want in ((0.0, o), (1.0, u)):
        uwc.mix_(model, o_files, u_files, lam)
        sd = model.state_dict()
        assert all(torch.equal(sd[k], want[k]) for k in want)
    uwc.mix_(model, o_files, u_files, 0.3)
    sd = model.state_dict()
    for k in o:
        assert torch.allclose(sd[k], 0.7 * o[k] + 0.3 * u[k], atol=1e-6)


@pytest.mark.parametrize("curve,target,want", [
    (lambda lam: 1 - lam ** 2, 0.9, math.sqrt(0.1)),  # smooth: the boundary at lam = 0.316
    (lambda lam: 1.0 if lam <= 0.55 else 0.2, 0.9, 0.55),  # a cliff
    (lambda lam: 1.0 if lam < 0.004 else 0.0, 0.9, 0.0),  # nothing but the original is feasible
])
def test_search_finds_the_largest_feasible_lambda(curve, target, want):
    lam, probes = uwc.search(curve, target)
    assert curve(lam) >= target and want - 0.01 <= lam <= want + 1e-9
    assert probes[0]["lam"] == 1.0 and len(probes) <= 9
    assert all(p["feasible"] == (p["retain_es"] >= target) for p in probes)


def bisection(curve, target):
    """The search by halving [0, 1] to 0.01, written out: the reference for uwc.search's lam*."""
    if curve(1.0) >= target:
        return 1.0, 1
    lo, hi, n = 0.0, 1.0, 1
    while hi - lo > 0.01:
        mid, n = round((lo + hi) / 2, 6), n + 1
        lo, hi = (mid, hi) if curve(mid) >= target else (lo, mid)
    return lo, n


def falling_curves(count, seed=0):
    """Retain ES curves that fall with lam, as a mean over 400 rows does: flat at e0, then a drop of
    `depth` spread as lam^p (smooth) or as a logistic step of any width (down to a cliff)."""
    import random
    rng = random.Random(seed)
    for _ in range(count):
        e0, depth = rng.uniform(0.6, 1.0), rng.uniform(0.15, 0.9)
        if rng.random() < 0.5:
            p = rng.uniform(1, 6)
            f, kind = (lambda lam, e0=e0, depth=depth, p=p: e0 - depth * e0 * lam ** p), "smooth"
        else:
            c, w = rng.uniform(-0.1, 1.1), 10 ** rng.uniform(-2.5, -0.3)
            s = lambda lam, c=c, w=w: 1 / (1 + math.exp(-(lam - c) / w))
            f, kind = (lambda lam, e0=e0, depth=depth, s=s: e0 - depth * e0 * (s(lam) - s(0))), "logistic"
        yield (lambda lam, f=f: round(f(lam) * 400) / 400), e0, kind


def test_search_equals_bisection_on_falling_curves_in_fewer_probes():
    """On a retain ES that falls with lam, lam* is bisection's exactly; on the smooth curves (lam^p) it takes
    fewer probes than bisection's 8, and never more than 2 x 8 on any."""
    smooth = []
    for i, (curve, e0, kind) in enumerate(falling_curves(2000)):
        want, n_bisection = bisection(curve, 0.9 * e0)
        lam, probes = uwc.search(curve, 0.9 * e0, at_zero=e0)
        assert lam == want, i
        assert all(p["feasible"] == (curve(p["lam"]) >= 0.9 * e0) for p in probes)
        assert len(probes) <= 2 * n_bisection
        if n_bisection > 1 and kind == "smooth":
            smooth.append(len(probes))
    assert len(smooth) > 500 and sum(smooth) / len(smooth) < 5, sum(smooth) / len(smooth)


def test_search_on_a_rising_curve_ends_at_a_boundary():
    """Where the ES does not fall with lam, lam* is still feasible and the next grid point is not."""
    curve = lambda lam: 0.95 if lam < 0.3 or 0.5 < lam < 0.6 else 0.5
    lam, probes = uwc.search(curve, 0.9, at_zero=0.95)
    after = round(lam + 1 / 128, 6)
    assert curve(lam) >= 0.9 and [p["feasible"] for p in probes if p["lam"] == after] == [False]


def test_search_keeps_a_model_that_already_satisfies():
    lam, probes = uwc.search(lambda lam: 0.95, 0.9)
    assert lam == 1.0 and len(probes) == 1


def test_uwc_command(two_models, tmp_path):
    import common
    original, unlearned = two_models
    out = tmp_path / "mixed"
    # a made-up retain-only reference for Forget Quality (the real one takes minutes to fine-tune)
    questions = [r["question"] for r in common.load_tofu("forget05")[:8]]
    stats = tmp_path / "retain_eval.json"
    reference = [0.5 + 0.05 * i for i in range(8)]
    stats.write_text(json.dumps(dict(split="forget05", per_sample=dict(forget=dict(
        question=questions, truth_ratio=reference)))))
    r = run_script("uwc.py", "--model", unlearned, "--split", "forget05", "--out", str(out), "--max-samples", "8",
                   "--tol", "0.02", "--retain-stats", str(stats))
    assert r.returncode == 0, r.stderr
    res = json.load(open(out / "uwc.json"))
    assert 0 <= res["lam"] <= 1 and res["probes"][0]["lam"] == 1.0
    feasible = [p["lam"] for p in res["probes"] if p["feasible"]]
    assert res["lam"] == max(feasible + [0.0])
    if res["lam"] < 1:  # an infeasible probe lies within 0.01 above lam*
        assert min(p["lam"] for p in res["probes"] if not p["feasible"]) - res["lam"] <= 0.01 + 1e-9
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)
    assert set(res["summary"]) >= {"es_exact_retain", "es_exact_unlearn", "model_utility"}
    # FQ: the KS test of the mixed model's forget truth ratios against the given reference, recomputed
    from scipy.stats import ks_2samp
    ratios = json.load(open(out / "eval.json"))["per_sample"]["forget"]["truth_ratio"]
    assert len(ratios) == 8
    want = math.log10(ks_2samp(ratios, reference).pvalue)
    assert res["summary"]["log10_forget_quality"] == pytest.approx(want, rel=1e-9)
    assert "ES-exact retain" in r.stdout and (out / "eval.json").is_file()


def test_uwc_bad_input(tmp_path):
    r = run_main("uwc.py", "--model", str(tmp_path / "nope"))
    assert r.returncode == 2 and "unlearned run folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_main("uwc.py", "--model", str(tmp_path), "--tol", "1.5", "--original", "tiny")
    assert r.returncode == 2 and "--tol must be in [0, 1)" in r.stderr


def test_uwc_no_fq(two_models, tmp_path, monkeypatch):
    """--no-fq reaches the final evaluation: FQ skipped, and no retain-only model is asked for."""
    import eval_tofu
    original, unlearned = two_models
    monkeypatch.setattr(eval_tofu, "tiny_retain_model", lambda *a: pytest.fail("retain-only model requested"))
    res = uwc.main(["--model", unlearned, "--split", "forget05", "--out", str(tmp_path / "mixed"), "--max-samples", "3",
                    "--tol", "0.99", "--no-fq"])
    assert res["lam"] == 1.0 and res["summary"]["log10_forget_quality"] is None
    d = json.load(open(tmp_path / "mixed" / "eval.json"))
    assert d["fq_skipped"] is True and d["forget_quality"] is None
    r = run_main("uwc.py", "--model", unlearned, "--no-fq", "--retain-stats", str(tmp_path / "x.json"))
    assert r.returncode == 2 and r.stderr.strip() == "uwc.py: error: --no-fq and --retain-stats exclude each other"


def test_sweep_probe_cut_short_stays_below_the_target_with_an_estimate(tiny_path):
    """sweep.py's retain ES probe: complete, the mean of every row's ES; cut short (the target out of reach),
    a value below the target, between the bounds of the rows not scored at ES 0 and at 1, and on the same
    weights as its last scoring exactly the mean (each batch not scored taken at its last ES)."""
    import common
    import eval_tofu
    import sweep
    model, tok = common.load_model(tiny_path, frozen=True), common.load_tokenizer(tiny_path)
    rows = common.split_data("forget05")["retain_eval"][:160]
    examples = common.encode_rows(tok, eval_tofu.model_defaults("tiny", tiny_path)[2], rows)
    want = sum(eval_tofu.es_exact(model, tok, rows, eval_tofu.model_defaults("tiny", tiny_path)[2], 32)) / len(rows)
    shortfall = {}
    mean, complete = sweep.retain_es_probe(model, tok, examples, -1.0, 32, False, shortfall)
    assert complete and mean == pytest.approx(want, abs=1e-12) and len(shortfall) == 5
    target = mean + 0.2
    est, complete = sweep.retain_es_probe(model, tok, examples, target, 32, False, shortfall)
    assert not complete and est == pytest.approx(mean, abs=1e-12) and est < target
    est, complete = sweep.retain_es_probe(model, tok, examples, target, 32, False, {})  # no last ES: extrapolated
    assert not complete and 0 < est < target
