"""Nothing to unlearn: a target model that never learnt the forget set (the tiny model after 2
fine-tuning steps, or with random weights) gets one warning line with its forget ES-exact, before the
first step, from every method script (with --no-eval too: the first 8 forget rows), once per split
from sweep.py, and about the original model from uwc.py and eval_tofu.py. The tiny target model, an
unlearned model and --min-forget-es 0 get none."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import common
import eval_tofu
import finetune
from conftest import ROOT, run_main

METHODS = ["ga", "wga", "npo", "tnpo", "wtnpo", "po", "rmu", "simnpo", "satimp", "idkdpo", "undial"]
VALUE = re.compile(r"has forget ES-exact (\d\.\d{4})")
OTHER_TEMPLATE = "{q} {a}"  # not the tiny model's: its forget ES-exact is about 0.5 under it, neither 0 nor 1


@pytest.fixture(scope="module")
def weak(tiny_path, tmp_path_factory):
    """Folders of two target models that do not know the forget set: the tiny model after 2 fine-tuning
    steps (finetune.py's folder, its args.json included) and the tiny architecture with random weights
    (no args.json); and an unlearning run from the random one (GA, 1 step), whose original that is."""
    root = tmp_path_factory.mktemp("weak")
    r = run_main("finetune.py", "--max-steps", "2", "--out", root / "two-steps")
    assert r.returncode == 0, r.stderr
    tokenizer = common.load_tokenizer(tiny_path)
    finetune.tiny_model(tokenizer, seed=0).save_pretrained(root / "random")
    tokenizer.save_pretrained(root / "random")
    r = run_main("ga.py", "--model", root / "random", "--data", "builtin", "--split", "forget01", "--max-steps", "1",
                 "--no-eval", "--out", root / "ga")
    assert r.returncode == 0, r.stderr
    return {name: str(root / name) for name in ("two-steps", "random", "ga")}


def forget_es(path, split, rows=None, template=common.QA_TEMPLATE):
    """The expected value, computed here: mean ES-exact of the first `rows` forget rows (None: all)."""
    model, tokenizer = common.load_model(path, frozen=True), common.load_tokenizer(path)
    return eval_tofu.mean(eval_tofu.es_exact(model, tokenizer, common.split_data(split)["forget"][:rows], template))


def warnings(text):
    return [line for line in text.splitlines() if "warning" in line]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_warns_once_before_the_first_step(method, weak, tmp_path):
    layer = ["--layer", "3"] if method == "rmu" else []  # not a preset: RMU's layer is needed
    r = run_main(f"{method}.py", "--model", weak["random"], "--data", "builtin", "--split", "forget01", "--max-steps",
                 "1", "--no-eval", "--no-save", "--out", tmp_path / "run", *layer,
                 merged=True)  # stdout and stderr in one stream, in the order written
    assert r.returncode == 0, r.stdout
    lines = r.stdout.splitlines()
    (w,) = [i for i, line in enumerate(lines) if "warning" in line]
    assert lines[w].startswith(f"{method}.py: warning: the target model has forget ES-exact ")
    assert "on the first 8 forget rows, below --min-forget-es 0.3: it hardly knows the forget set" in lines[w]
    assert VALUE.search(lines[w]).group(1) == f"{forget_es(weak['random'], 'forget01', 8):.4f}"
    assert w < next(i for i, line in enumerate(lines) if line.startswith("step 1/1 |"))


@pytest.mark.parametrize("no_eval", [False, True])
@pytest.mark.parametrize("model", ["two-steps", "tiny under another template"])
def test_the_value_is_the_forget_es_before_unlearning(model, no_eval, weak, tiny_path, tmp_path):
    """With the evaluation: the mean over the forget set, the 'before' of the run's last ES-exact line;
    with --no-eval: the first 8 rows' (their mean differs from the whole set's under the other template)."""
    if model == "two-steps":  # the case: a target model fine-tuned for 2 steps
        path, template, flags = weak["two-steps"], common.QA_TEMPLATE, ["--model", weak["two-steps"]]
    else:  # a value neither 0 nor 1, below a threshold raised to 0.9
        path, template, flags = tiny_path, OTHER_TEMPLATE, ["--template", OTHER_TEMPLATE, "--min-forget-es", "0.9"]
    r = run_main("wga.py", *flags, "--data", "builtin", "--split", "forget01", "--max-steps", "1", "--no-save",
                 "--out", tmp_path / "run", *(["--no-eval"] if no_eval else []))
    assert r.returncode == 0, r.stderr
    (line,) = warnings(r.stderr)
    want = forget_es(path, "forget01", 8 if no_eval else None, template)
    assert VALUE.search(line).group(1) == f"{want:.4f}" and ("on the first 8 forget rows" in line) == no_eval
    if model != "two-steps":
        assert 0.3 < want < 0.7 and want != forget_es(path, "forget01", None if no_eval else 8, template)
    if not no_eval:
        assert f"ES-exact forget {want:.4f} -> " in r.stdout


def test_no_warning_on_the_target_model_nor_when_off(weak, tmp_path, monkeypatch):
    for flags in ([], ["--no-eval"]):  # the tiny target model knows its forget set (ES-exact 1)
        r = run_main("wga.py", "--split", "forget01", "--max-steps", "1", "--no-save", "--out", tmp_path / "t",
                     "--overwrite", *flags)
        assert r.returncode == 0 and not warnings(r.stderr), r.stderr
    calls = []
    es_exact = eval_tofu.es_exact
    monkeypatch.setattr(eval_tofu, "es_exact", lambda *a, **k: calls.append(1) or es_exact(*a, **k))
    argv = ["wga.py", "--model", weak["random"], "--data", "builtin", "--split", "forget01", "--max-steps", "1",
            "--no-eval", "--no-save", "--out", tmp_path / "r", "--overwrite"]
    r = run_main(*argv)
    assert len(warnings(r.stderr)) == 1 and calls == [1]  # the check: one pass
    r = run_main(*argv, "--min-forget-es", "0")
    assert r.returncode == 0 and not warnings(r.stderr) and calls == [1], r.stderr  # off: not even its pass


@pytest.mark.parametrize("script", ["wga.py", "sweep.py", "uwc.py", "eval_tofu.py"])
def test_bad_threshold(script):
    r = run_main(script, "--min-forget-es", "1.5")
    assert r.returncode == 2 and r.stderr == (f"{script}: error: argument --min-forget-es: must be a number in "
                                              f"[0, 1], got '1.5'\n")


def test_sweep_warns_once_per_split_not_per_configuration(weak, tmp_path):
    out = tmp_path / "sw"
    r = run_main("sweep.py", "--model", weak["random"], "--data", "builtin", "--method", "wga", "--grid", "1,5",
                 "--split", "forget01", "--epochs", "0.1", "--no-table1", "--out", out)
    assert r.returncode == 0, r.stderr
    (line,) = warnings(r.stderr)
    assert line.startswith(f"sweep.py: warning: the target model {weak['random']} on forget01 has forget ES-exact ")
    assert VALUE.search(line).group(1) == f"{forget_es(weak['random'], 'forget01'):.4f}"
    runs = list((out / "runs").iterdir())  # the two configurations ran without the check
    assert len(runs) == 2 and all(json.load(open(d / "args.json"))["min_forget_es"] == 0 for d in runs)


def test_eval_tofu_warns_on_a_model_before_unlearning_only(weak, tiny_path, tmp_path):
    def ev(model, *flags):
        return run_main("eval_tofu.py", "--model", model, "--data", "builtin", "--split", "forget01", "--no-fq",
                        "--max-samples", "3", "--max-new-tokens", "2", "--out", tmp_path / "e.json", *flags)

    cases = [(weak["two-steps"], common.QA_TEMPLATE, []), (weak["random"], common.QA_TEMPLATE, []),
             (tiny_path, OTHER_TEMPLATE, ["--template", OTHER_TEMPLATE, "--min-forget-es", "0.9"])]
    for path, template, flags in cases:  # finetune.py's folder, a folder without args.json, the tiny target model
        r = ev(path, *flags)
        assert r.returncode == 0, r.stderr
        (line,) = [w for w in warnings(r.stderr) if "forget ES-exact" in w]  # (the tiny one: --template's too)
        want = forget_es(path, "forget01", 3, template)
        assert line.startswith(f"eval_tofu.py: warning: {path}, a model before unlearning, has forget ES-exact "
                               f"{want:.4f} on the first 3 forget rows, below --min-forget-es ")
        assert json.load(open(tmp_path / "e.json"))["forget_es_warning"] == line.split(": warning: ", 1)[1]
    retain_only = shutil.copytree(weak["two-steps"], tmp_path / "retain95")  # as if fine-tuned on retain95
    args = json.load(open(retain_only / "args.json"))
    (retain_only / "args.json").write_text(json.dumps(dict(args, split="retain95")))
    for path in (tiny_path, weak["ga"], retain_only):  # knows it; unlearned (the point); never saw it (the point)
        r = ev(path)
        assert r.returncode == 0 and not warnings(r.stderr), r.stderr
        assert json.load(open(tmp_path / "e.json"))["forget_es_warning"] is None


def test_uwc_warns_when_the_original_does_not_know_the_forget_set(weak, tmp_path, monkeypatch):
    # the final evaluation's generations (up to 200 tokens from a model that never stops) are not the point here
    monkeypatch.setattr(eval_tofu, "generate", lambda model, tokenizer, examples, *a, **k: [""] * len(examples))
    r = run_main("uwc.py", "--model", weak["ga"], "--split", "forget01", "--no-fq", "--max-samples", "3",
                 "--out", tmp_path / "mix")
    assert r.returncode == 0, r.stderr
    (line,) = warnings(r.stderr)  # one: its final evaluation is of the mixed model, not of a model before unlearning
    assert line.startswith(f"uwc.py: warning: the original model {weak['random']} has forget ES-exact "
                           f"{forget_es(weak['random'], 'forget01'):.4f}, below --min-forget-es 0.3")
    out = tmp_path / "ga-tiny"
    assert run_main("ga.py", "--split", "forget01", "--max-steps", "1", "--no-eval", "--out", out).returncode == 0
    r = run_main("uwc.py", "--model", out, "--split", "forget01", "--no-fq", "--max-samples", "3")
    assert r.returncode == 0 and not warnings(r.stderr), r.stderr  # the tiny target model: ES-exact 1


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_under_torchrun_rank_0_warns_once(weak, tmp_path):
    """--no-eval's check runs on both processes (the sharded model's forward is collective), rank 0 says it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "wga.py", "--model", weak["random"], "--data", "builtin", "--split", "forget01", "--max-steps",
                        "1", "--no-eval", "--no-save", "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line for line in warnings(r.stderr) if "ES-exact" in line] == [
        f"wga.py: warning: the target model has forget ES-exact {forget_es(weak['random'], 'forget01', 8):.4f} on the "
        f"first 8 forget rows, below --min-forget-es 0.3: it hardly knows the forget set, so there is little to "
        f"unlearn; usually it is not the fine-tuned model (a base model, a fine-tune cut short) or --data is not the "
        f"data it was fine-tuned on"]
    assert "step 1/1 |" in r.stdout
