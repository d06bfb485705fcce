"""No silent numbers: eval_tofu.py and uwc.py score the split a run was unlearned on (its args.json) and
warn once when told otherwise; a NaN or infinite value stops an evaluation in one line naming it; FQ's
p = 0 is valid JSON; a broken args.json and weights that do not fit the model are refused, one line each."""
import json
import math
import os
import shutil
import signal
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import ks_2samp

import common
import eval_tofu
import sweep
import uwc
from conftest import run_main
from test_first_use import data_folder

QA = common.QA_TEMPLATE
NEVER = "a NaN or infinite value is never averaged into a score"


def run_folder(tiny_path, dst, **fields):
    """A copy of the tiny target model whose args.json records `fields` (e.g. the split of a method run)."""
    shutil.copytree(tiny_path, dst, ignore=shutil.ignore_patterns("eval*.json"))
    a = json.loads((dst / "args.json").read_text())
    (dst / "args.json").write_text(json.dumps(dict(a, **fields)))
    return dst


def lines(text, kind):
    """The `script: warning:` or `script: error:` lines of stderr (not the progress bars)."""
    return [line for line in text.splitlines() if f": {kind}: " in line]


def strict_json(path):
    """json.load that refuses NaN and +-Infinity, as strict readers (JavaScript, jq) do."""
    def refuse(name):
        raise ValueError(f"{name} in {path}")
    return json.loads(open(path).read(), parse_constant=refuse)


def via_cli(module, argv, capsys, monkeypatch):
    """module.main(argv) as `python module.py ...` runs it, through common.cli (which reports NonFinite):
    returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            common.cli(lambda: module.main(argv))
    finally:
        signal.signal(signal.SIGTERM, old)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope="module")
def forget01_run(tiny_path, tmp_path_factory):
    """One small step of GA on forget01 (the model still stops its answers): its args.json records split forget01."""
    out = tmp_path_factory.mktemp("no_silent") / "ga01"
    r = run_main("ga.py", "--split", "forget01", "--max-steps", "1", "--lr", "1e-5", "--no-eval", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


# ----------------------------------------------------------------------------- the split of the run's args.json

def test_eval_scores_the_split_the_run_was_unlearned_on(tiny_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["eval_tofu.py"])
    run = run_folder(tiny_path, tmp_path / "run", split="forget01")
    argv = ["--model", str(run), "--no-fq", "--max-samples", "2", "--max-new-tokens", "2"]
    d = eval_tofu.main(argv + ["--out", str(tmp_path / "a.json")])
    assert d["split"] == "forget01" == strict_json(tmp_path / "a.json")["split"]
    assert d["per_sample"]["forget"]["question"] == [r["question"] for r in common.load_tofu("forget01")[:2]]
    assert lines(capsys.readouterr().err, "warning") == []
    d = eval_tofu.main(argv + ["--split", "forget10", "--out", str(tmp_path / "b.json")])
    assert d["per_sample"]["forget"]["question"] == [r["question"] for r in common.load_tofu("forget10")[:2]]
    assert lines(capsys.readouterr().err, "warning") == [
        f"eval_tofu.py: warning: {run} records split forget01 in its args.json, not forget10: eval_tofu.py goes by "
        f"--split forget10"]
    eval_tofu.main(argv + ["--split", "forget01", "--out", str(tmp_path / "c.json")])  # the same: no warning
    assert lines(capsys.readouterr().err, "warning") == []


def test_a_finetuned_folder_has_no_forget_split(tiny_path, tmp_path, capsys):
    """finetune.py records split full (or retainXX): forget05 as before, and no warning for another split."""
    model = run_folder(tiny_path, tmp_path / "m")
    assert json.loads((model / "args.json").read_text())["split"] == "full"
    argv = ["--model", str(model), "--no-fq", "--max-samples", "2", "--max-new-tokens", "2"]
    assert eval_tofu.main(argv + ["--out", str(tmp_path / "a.json")])["split"] == "forget05"
    assert eval_tofu.main(argv + ["--split", "forget10", "--out", str(tmp_path / "b.json")])["split"] == "forget10"
    assert lines(capsys.readouterr().err, "warning") == []


def test_given_split_template_and_data_that_differ_warn_once_each(tiny_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["eval_tofu.py"])
    run = run_folder(tiny_path, tmp_path / "run", split="forget01")
    data = os.path.realpath(data_folder(tmp_path / "data", extra_word=False))
    other = "Q: {q}\nA: {a}"
    d = eval_tofu.main(["--model", str(run), "--split", "forget05", "--template", other, "--data", data, "--no-fq",
                        "--max-samples", "2", "--max-new-tokens", "2", "--out", str(tmp_path / "e.json")])
    assert (d["split"], d["template"], d["data"]) == ("forget05", other, data)
    assert lines(capsys.readouterr().err, "warning") == [
        f"eval_tofu.py: warning: {run} records split forget01 in its args.json, not forget05: eval_tofu.py goes by "
        f"--split forget05",
        f"eval_tofu.py: warning: {run} records template {QA!r} in its args.json, not {other!r}: eval_tofu.py goes "
        f"by --template",
        f"eval_tofu.py: warning: {run} was trained on data builtin, not on {data}: its numbers on {data} measure a "
        f"model that never learnt that data"]


def test_uwc_mixes_on_the_runs_split_and_its_folder_evaluates_alone(forget01_run, tiny_path, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr(sys, "argv", ["uwc.py"])
    # the search's passes over the 400 held-out rows are skipped (lam* = 1): the search is test_uwc.py's
    monkeypatch.setattr(eval_tofu, "es_exact", lambda model, tok, rows, *a, **k: [1.0] * len(rows))
    out = tmp_path / "mixed"
    res = uwc.main(["--model", str(forget01_run), "--tol", "0.99", "--no-fq", "--max-samples", "2", "--out", str(out)])
    assert res["split"] == "forget01" and strict_json(out / "eval.json")["split"] == "forget01"
    a = strict_json(out / "args.json")  # what eval_tofu.py needs to score the mixed folder alone
    assert (a["split"], a["data"], a["template"], a["original"]) == ("forget01", "builtin", QA, "tiny")
    assert lines(capsys.readouterr().err, "warning") == []
    # the -uwc folder alone: its split, data and template, and the tiny preset's retain-only model (a stand-in)
    stand_in = str(run_folder(tiny_path, tmp_path / "retain99"))
    monkeypatch.setattr(eval_tofu, "tiny_retain_model", lambda split, data="builtin": stand_in)
    d = eval_tofu.main(["--model", str(out), "--max-samples", "2", "--max-new-tokens", "2",
                        "--out", str(tmp_path / "e.json")])
    assert (d["split"], d["data"], d["template"], d["fq_retain_model"]) == ("forget01", "builtin", QA, stand_in)
    assert d["per_sample"]["forget"]["question"] == [r["question"] for r in common.load_tofu("forget01")[:2]]
    assert lines(capsys.readouterr().err, "warning") == []
    # another --split: used, with one warning line
    res = uwc.main(["--model", str(forget01_run), "--split", "forget05", "--tol", "0.99", "--no-fq", "--max-samples",
                    "2", "--out", str(tmp_path / "mixed05")])
    assert res["split"] == "forget05" == strict_json(tmp_path / "mixed05" / "args.json")["split"]
    assert lines(capsys.readouterr().err, "warning") == [
        f"uwc.py: warning: {forget01_run} records split forget01 in its args.json, not forget05: uwc.py goes by "
        f"--split forget05"]


# ----------------------------------------------------------------------------- NaN and infinity in the aggregates

def test_mean_names_the_metric_set_and_row():
    assert eval_tofu.mean([1.0, 0.5, 0.0], "ES-exact", "forget") == 0.5
    for bad, shown in ((math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")):
        with pytest.raises(common.NonFinite) as e:
            eval_tofu.mean([1.0, 0.5, bad], "ROUGE-L", "world_facts")
        assert str(e.value) == f"ROUGE-L of row 2 of the world_facts set is {shown}: {NEVER}"


def test_truth_ratio_stat_stops_at_nan_and_keeps_an_underflowed_zero():
    # R = 0 (a ratio that underflowed) is a value: min(R, 1/R) = 0; by hand (0.5 + 0 + 0.25) / 3
    assert eval_tofu.truth_ratio_stat([0.5, 0.0, 4.0], forget=True) == pytest.approx(0.25)
    assert eval_tofu.truth_ratio_stat([0.5, 0.0, 4.0], forget=False) == pytest.approx((0.5 + 1 + 0) / 3)
    with pytest.raises(common.NonFinite) as e:
        eval_tofu.truth_ratio_stat([0.5, math.nan, 2.0], forget=True)  # once 0.0 by "if r > 0 else 0"
    assert str(e.value) == f"truth ratio of row 1 of the forget set is nan: {NEVER}"
    with pytest.raises(common.NonFinite) as e:
        eval_tofu.truth_ratio_stat([0.5, 2.0, math.nan], forget=False, where="retain")  # once 0.0 by max(0, nan)
    assert str(e.value) == f"truth ratio of row 2 of the retain set is nan: {NEVER}"
    with pytest.raises(common.NonFinite, match="truth ratio of row 0 of the forget set is inf"):
        eval_tofu.truth_ratio_stat([math.inf], forget=True)


def test_model_utility_and_forget_quality_refuse_nan():
    names = [f"part {i}" for i in range(9)]
    assert eval_tofu.model_utility([0.5] * 9, names) == pytest.approx(0.5)
    for bad in (math.nan, math.inf):
        with pytest.raises(common.NonFinite) as e:
            eval_tofu.model_utility([0.5] * 8 + [bad], names)
        assert str(e.value) == f"Model Utility's part 8 is {bad}: {NEVER}"
    with pytest.raises(common.NonFinite) as e:
        eval_tofu.forget_quality([0.1, 0.2, 0.3], [0.3, math.nan])
    assert str(e.value) == f"the retain-only model's truth ratio of row 1 of the forget set is nan: {NEVER}"
    with pytest.raises(common.NonFinite, match="truth ratio of row 0 of the forget set is nan"):
        eval_tofu.forget_quality([math.nan], [0.3])


@pytest.mark.parametrize("where,want", [("truth_ratio", "truth ratio of row 1 of the retain set is nan"),
                                        ("score", "Probability of row 2 of the retain set is nan")])
def test_a_nan_stops_eval_tofu_in_one_line(where, want, tiny_path, tmp_path, capsys, monkeypatch):
    """A NaN for one row (made here; a model with NaN log-probabilities gives it) stops the command with
    exit status 1 and one line naming the metric, set and row; nothing is written."""
    if where == "truth_ratio":
        real = eval_tofu.truth_ratio
        monkeypatch.setattr(eval_tofu, "truth_ratio",
                            lambda b, p: [math.nan if i == 1 else r for i, r in enumerate(real(b, p))])
    else:  # the first pass, the retain rows' P̄(answer): row 2's mean log-prob is NaN
        real, calls = eval_tofu.score, []

        def score(*a, **k):
            logp, es = real(*a, **k)
            if logp is None:  # a pass for ES alone (logp=False)
                return logp, es
            calls.append(1)
            return [math.nan if i == 2 and len(calls) == 1 else x for i, x in enumerate(logp)], es
        monkeypatch.setattr(eval_tofu, "score", score)
    out = tmp_path / "e.json"
    code, _, err = via_cli(eval_tofu, ["--model", tiny_path, "--no-fq", "--max-samples", "3", "--max-new-tokens", "2",
                                       "--out", str(out)], capsys, monkeypatch)
    assert code == 1 and lines(err, "error") == [f"eval_tofu.py: error: {want}: {NEVER}"], err
    assert "Traceback" not in err and not tmp_path.joinpath("e.json").exists() and os.listdir(tmp_path) == []


def test_a_nan_in_uwcs_search_stops_it_in_one_line(forget01_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_tofu, "es_exact", lambda model, tok, rows, *a, **k: [math.nan if i == 3 else 1.0
                                                                                  for i in range(len(rows))])
    out = tmp_path / "mixed"
    code, _, err = via_cli(uwc, ["--model", str(forget01_run), "--no-fq", "--out", str(out)], capsys, monkeypatch)
    assert code == 1 and lines(err, "error") == [
        f"uwc.py: error: ES-exact of row 3 of the held-out retain set is nan: {NEVER}"], err
    assert "Traceback" not in err and not out.exists()


def test_a_nan_stops_the_sweep_in_one_line(tmp_path, monkeypatch):
    real = eval_tofu.score

    def score(*a, **k):  # every ES pass: row 0 is NaN
        logp, es = real(*a, **k)
        return logp, [math.nan] + es[1:]
    monkeypatch.setattr(eval_tofu, "score", score)
    out = tmp_path / "sw"
    r = run_main("sweep.py", "--method", "ga", "--split", "forget01", "--no-table1", "--out", str(out))
    assert r.returncode == 1 and lines(r.stderr, "error") == [
        f"sweep.py: error: forget01, before unlearning: ES-exact of row 0 of the held-out retain set is nan: "
        f"{NEVER}"], r.stderr
    assert not list(out.glob("runs/*/row.json")) and not list(out.glob("runs/*.tmp"))


# ----------------------------------------------------------------------------- FQ's p = 0 and valid JSON

def test_write_json_refuses_nan_and_infinity(tmp_path):
    path = tmp_path / "e.json"
    path.write_text("old\n")
    for obj, where in ((dict(summary=dict(model_utility=math.nan)), "summary.model_utility"),
                       (dict(per_sample=dict(forget=dict(prob=[0.5, 0.2, -math.inf]))), "per_sample.forget.prob[2]")):
        with pytest.raises(common.NonFinite) as e:
            eval_tofu.write_json(str(path), obj)
        assert str(e.value) == f"{path} not written: {where} is not a finite number"
        assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["e.json"]  # no temporary file either
    eval_tofu.write_json(str(path), dict(x=[1.5, None]))
    assert strict_json(path) == dict(x=[1.5, None])


def test_log10_fq():
    assert eval_tofu.log10_fq(1.0) == (0.0, None)
    assert eval_tofu.log10_fq(1e-5) == (pytest.approx(-5.0), None)
    assert eval_tofu.log10_fq(0.0) == (None, "< -300")


def test_fq_of_p_zero_is_valid_json_and_printed_as_a_bound(tiny_path, tmp_path, capsys, monkeypatch):
    questions = [r["question"] for r in common.load_tofu("forget05")[:3]]
    stats = tmp_path / "rs.json"
    stats.write_text(json.dumps(dict(split="forget05", per_sample=dict(forget=dict(question=questions,
                                                                                   truth_ratio=[0.3, 0.4, 0.5])))))
    monkeypatch.setattr(eval_tofu, "forget_quality", lambda *a: 0.0)  # a p-value that underflowed
    out = tmp_path / "e.json"
    eval_tofu.main(["--model", tiny_path, "--retain-stats", str(stats), "--max-samples", "3", "--max-new-tokens", "2",
                    "--out", str(out)])
    d = strict_json(out)
    assert d["forget_quality"] == 0.0 and d["log10_forget_quality"] is d["summary"]["log10_forget_quality"] is None
    assert d["log10_forget_quality_bound"] == d["summary"]["log10_forget_quality_bound"] == "< -300"
    printed = capsys.readouterr().out.splitlines()
    assert printed[printed.index("| --- | --- | --- | --- | --- | --- | --- | --- |") + 1].split(" | ")[5] == "< -300"
    assert any(line.startswith("FQ: p < 1e-300 against the retain stats") for line in printed)


def test_sweeps_table1_of_p_zero(tmp_path, monkeypatch):
    """A real p = 0: 1000 forget truth ratios all below 1000 others (KS p ~ 1e-600, below any double)."""
    mine, ref = [0.001 * i for i in range(1000)], [10 + 0.001 * i for i in range(1000)]
    assert ks_2samp(mine, ref).pvalue == 0.0
    metrics = {s: dict(es_exact=1.0, es_perturb=0.5) for s in ("retain", "forget")}
    monkeypatch.setattr(eval_tofu, "evaluate", lambda *a, **k: dict(
        metrics=metrics, model_utility=0.7, per_sample=dict(forget=dict(truth_ratio=mine))))
    monkeypatch.setattr(sweep, "reset_", lambda *a: None)
    sw = sweep.Sweep.__new__(sweep.Sweep)  # no models: evaluate is the stand-in above
    sw.args = SimpleNamespace(batch_size=8, es_eos=False)
    sw.model = sw.ref_model = sw.tokenizer = sw.template = sw.lora = None
    sw.split = lambda split: dict(sets={})
    row = sw.table1_row(None, "forget05", {}, ref)
    assert row["log10_forget_quality"] is None and row["log10_forget_quality_bound"] == "< -300"
    args = SimpleNamespace(model="tiny", es_eos=False, seed=0, lr=None, epochs=None, batch_size=64)
    fake = SimpleNamespace(splits={}, layers={}, preset="tiny", path="p", data="builtin", tol=0.1, template=QA, args=args)
    sweep.write_outputs(tmp_path, fake, [], {}, [row])
    assert "| forget05 | before unlearning |  | 1.0000 | 1.0000 | 0.5000 | 0.5000 | 0.7000 | < -300 |" in \
        (tmp_path / "table1.md").read_text().splitlines()
    t1 = strict_json(tmp_path / "table1.json")["rows"][0]
    assert t1["log10_forget_quality"] is None and t1["log10_forget_quality_bound"] == "< -300"


# ----------------------------------------------------------------------------- a broken args.json

BROKEN = [('{"model": "tiny", ', "is not valid JSON"), ('["tiny"]', "is not a JSON object"),
          ('{"model": "tiny", "split": 5}', "'split' is not a string but 5")]


@pytest.mark.parametrize("text,msg", BROKEN)
def test_a_broken_args_json_is_an_error_everywhere_it_is_read(text, msg, tiny_path, tmp_path):
    folder = run_folder(tiny_path, tmp_path / "m")
    (folder / "args.json").write_text(text)
    f = str(folder / "args.json")
    for read in (common.run_args, lambda p: common.warn_data(p, "builtin"), lambda p: eval_tofu.model_defaults(p, p),
                 lambda p: eval_tofu.target_of(p, "builtin")):
        with pytest.raises(common.UsageError) as e:
            read(str(folder))
        assert f in str(e.value) and msg in str(e.value)
    assert common.run_args(str(tmp_path)) == {}  # no args.json: a folder of one's own, fine


@pytest.mark.parametrize("script", ["eval_tofu.py", "uwc.py", "ga.py"])
def test_a_broken_args_json_stops_the_scripts_in_one_line(script, tiny_path, tmp_path):
    folder = run_folder(tiny_path, tmp_path / "m")
    (folder / "args.json").write_text("[1, 2]")
    extra = dict(ga=["--data", "builtin", "--max-steps", "1", "--out", str(tmp_path / "r")],
                 uwc=["--no-fq", "--out", str(tmp_path / "r")],
                 eval_tofu=["--no-fq", "--out", str(tmp_path / "r" / "e.json")])[script[:-3]]
    r = run_main(script, "--model", str(folder), *extra)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"{script}: error: {folder}/args.json is not a JSON object (it should hold the flags of the run that made "
        f"the model)"], r.stderr
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- uwc.mix_: the tensors must fit

@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    return common.load_model(tiny_path, frozen=True)


def weights(folder, tensors):
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return uwc.safetensors_files(str(folder))


@pytest.mark.parametrize("case,msg", [
    ("extra", "the unlearned weights hold tensors the model does not have (1, e.g. extra.weight)"),
    ("lacking", "the unlearned weights lack tensors of the model (1, e.g. model.norm.weight)"),
    ("no_original", "the original model lacks tensors of the unlearned one (1, e.g. model.norm.weight)"),
    ("shape", "model.norm.weight is (64,) in the unlearned weights but (128,) in the model"),
    ("shape_original", "model.norm.weight is (64,) in the original weights but (128,) in the model"),
])
def test_mix_refuses_weights_that_do_not_fit(case, msg, tiny_model, tiny_path, tmp_path):
    theta = load_file(f"{tiny_path}/model.safetensors")
    o, u = dict(theta), {k: v + 1 for k, v in theta.items()}
    if case == "extra":
        u["extra.weight"] = torch.zeros(3)
    elif case == "lacking":
        del u["model.norm.weight"]
    elif case == "no_original":
        del o["model.norm.weight"]
    else:
        (u if case == "shape" else o)["model.norm.weight"] = torch.ones(64)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(common.UsageError) as e:
        uwc.mix_(tiny_model, weights(tmp_path / "o", o), weights(tmp_path / "u", u), 0.5)
    assert str(e.value) == f"cannot mix: {msg}: not the same architecture"
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())  # nothing mixed


def test_mix_takes_a_tied_output_layer_from_the_embeddings(tmp_path):
    """save_pretrained stores a tied lm_head once, as the embeddings: mixed through them, not refused."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=True)
    for seed, name in ((0, "o"), (1, "u")):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / name)
    o, u = (uwc.safetensors_files(str(tmp_path / n)) for n in ("o", "u"))
    assert "lm_head.weight" not in u and "model.embed_tokens.weight" in u  # the tie is not stored
    model = common.load_model(str(tmp_path / "u"), frozen=True)
    uwc.mix_(model, o, u, 0.25)
    emb = [load_file(str(tmp_path / n / "model.safetensors"))["model.embed_tokens.weight"] for n in ("o", "u")]
    assert torch.allclose(model.lm_head.weight, 0.75 * emb[0] + 0.25 * emb[1], atol=1e-6)


def test_uwc_with_an_original_of_another_shape_stops_in_one_line(tiny_path, tmp_path):
    run = run_folder(tiny_path, tmp_path / "run", split="forget01")
    other = tmp_path / "other"
    theta = load_file(f"{tiny_path}/model.safetensors")
    weights(other, dict(theta, **{"model.norm.weight": torch.ones(64)}))
    r = run_main("uwc.py", "--model", str(run), "--original", str(other), "--no-fq", "--out", str(tmp_path / "mixed"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "uwc.py: error: cannot mix: model.norm.weight is (64,) in the original weights but (128,) in the model: "
        "not the same architecture"], r.stderr
    assert not (tmp_path / "mixed").exists()
