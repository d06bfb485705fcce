"""sweep.py: one configuration equals the method script followed by uwc.py, Table 1's row equals
eval_tofu.py on the kept model, a killed sweep resumes to the same result, bad input writes nothing."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import sweep
import uwc
from conftest import ROOT, run_main

QA = "Question: {q}\nAnswer: {a}"
SCORES = ("es_exact_retain", "es_exact_unlearn", "es_perturb_retain", "es_perturb_unlearn")


def retain_stats(path, split="forget01"):
    """A made-up retain-only reference for Forget Quality (the real one takes minutes to fine-tune)."""
    import common
    questions = [r["question"] for r in common.load_tofu(split)]
    path.write_text(json.dumps(dict(split=split, per_sample=dict(forget=dict(
        question=questions, truth_ratio=[0.4 + 0.05 * i for i in range(len(questions))])))))
    return str(path)


def rows(folder):
    """sweep.json's rows without their timings."""
    drop = ("seconds", "seconds_unlearn")
    return [{k: v for k, v in r.items() if k not in drop} for r in json.load(open(folder / "sweep.json"))["rows"]]


def four_es(folder, split):
    """The four ES values of the model in `folder`, computed here row by row on the sets the sweep scores:
    the held-out retain rows and the forget rows, with their questions and with the paraphrased ones."""
    import common
    import eval_tofu
    model, tok = common.load_model(str(folder), frozen=True), common.load_tokenizer(str(folder))
    d, sets = common.split_data(split), eval_tofu.load_sets(split, "builtin")
    es = lambda rows, q="question": sum(eval_tofu.es_exact(model, tok, rows, QA, question=q)) / len(rows)
    return dict(es_exact_retain=es(d["retain_eval"]), es_exact_unlearn=es(d["forget"]),
                es_perturb_retain=es(sets["retain"][1], "paraphrased_question"),
                es_perturb_unlearn=es(sets["forget"][1], "paraphrased_question"))


def test_one_configuration_equals_the_script_and_uwc(tmp_path):
    # GA on forget01 with a 2% tolerance: the search has to bisect, so the mixing is exercised
    r = run_main("sweep.py", "--method", "ga", "--split", "forget01", "--tol", "0.02", "--no-table1",
                 "--out", str(tmp_path / "sw"))
    assert r.returncode == 0, r.stderr
    (row,) = rows(tmp_path / "sw")
    assert row["method"] == "ga" and row["params"] == {} and 0 < row["lam"] < 1
    r = run_main("ga.py", "--split", "forget01", "--reg", "kl", "--no-eval", "--out", str(tmp_path / "ga"))
    assert r.returncode == 0, r.stderr
    # uwc.py's search on all 400 held-out rows; its final evaluation on one row only (it is not compared)
    r = run_main("uwc.py", "--model", str(tmp_path / "ga"), "--split", "forget01", "--tol", "0.02",
                 "--retain-stats", retain_stats(tmp_path / "stats.json"), "--max-samples", "1")
    assert r.returncode == 0, r.stderr
    assert row["lam"] == json.load(open(tmp_path / "ga-uwc" / "uwc.json"))["lam"]
    want = four_es(tmp_path / "ga-uwc", "forget01")  # of the mixed model uwc.py saved
    for k in SCORES:  # the same weights, the same batches: equal, not close
        assert row[k] == want[k], k


def test_table1_row_is_the_unmixed_model_evaluated_fully(tmp_path):
    stats = retain_stats(tmp_path / "stats-forget01.json")
    out = tmp_path / "sw"
    # one configuration (the pick among several, ties included: test_rank_...); UWC with no tolerance,
    # so that lam* < 1 and Table 1's unmixed row differs from UWC's
    r = run_main("sweep.py", "--method", "npo", "--split", "forget01", "--grid", "0.5", "--tol", "0", "--seeds", "1",
                 "--keep", "--retain-stats", str(tmp_path / "stats-{split}.json"), "--max-samples", "20",
                 "--max-new-tokens", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    sw = json.load(open(out / "sweep.json"))
    best = min(sw["rows"], key=sweep.rank)
    assert sw["best"]["npo/forget01"]["params"] == best["params"]
    assert sw["best"]["npo/forget01"]["paper_default"] == {"beta": 0.5}
    t1 = json.load(open(out / "table1.json"))["rows"]
    assert [x["method"] for x in t1] == [None, "npo"] and t1[1]["params"] == best["params"]
    # the kept run folder holds the model before UWC: eval_tofu.py on it gives Table 1's row
    kept = out / "runs" / sweep.name_of("npo", "forget01", best["params"])
    r = run_main("eval_tofu.py", "--model", str(kept), "--split", "forget01", "--retain-stats", stats,
                 "--max-samples", "20", "--max-new-tokens", "4", "--out", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr
    summary = json.load(open(tmp_path / "eval.json"))["summary"]
    for k in SCORES + ("model_utility", "log10_forget_quality"):
        assert t1[1][k] == pytest.approx(summary[k], abs=1e-12), k
    # unmixed, not UWC's model: uwc.py on the kept folder finds the same lam* < 1 and keeps more of the retain rows
    r = run_main("uwc.py", "--model", str(kept), "--split", "forget01", "--tol", "0", "--retain-stats", stats,
                 "--max-samples", "20")
    assert r.returncode == 0, r.stderr
    mixed = json.load(open(out / "runs" / (kept.name + "-uwc") / "uwc.json"))
    assert mixed["lam"] == best["lam"] < 1 and mixed["summary"]["es_exact_retain"] > t1[1]["es_exact_retain"]
    t1_json = json.load(open(out / "table1.json"))
    assert (t1_json["max_samples"], t1_json["max_new_tokens"]) == (20, 4)
    md = (out / "table1.md").read_text()
    assert "| forget01 | NPO |" in md and "after UWC" in md and "first 20 rows of each set only" in md
    assert "at most 4 new tokens" in md
    tables = (out / "tables.md").read_text()
    assert "## NPO (the paper's Table 3)" in tables
    assert all(f"| forget01 | {v} |" in tables for v in ("before unlearning", "0.5"))
    assert (out / "tuning-npo.png").stat().st_size > 10_000
    (tmp_path / "again").mkdir()  # figures.py redraws it from sweep.json, byte for byte
    assert run_main("figures.py", "tuning", out, "-o", tmp_path / "again").returncode == 0
    assert (tmp_path / "again" / "tuning-npo.png").read_bytes() == (out / "tuning-npo.png").read_bytes()


def test_a_killed_sweep_resumes_to_the_same_result(tmp_path):
    # a tolerance that each configuration meets unmixed (lam* = 1 at the first probe): the resume is the point
    args = ["sweep.py", "--method", "wga", "--split", "forget01", "--grid", "1,5", "--tol", "0.9",
            "--no-table1"]
    r = run_main(*args, "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "b"
    # SIGINT back to its default in the child: a suite started in the background (nohup, `&`) has it
    # ignored, and a child inherits that
    p = subprocess.Popen([sys.executable, *args, "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not list(out.glob("runs/*/row.json")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted" in err and not list(out.glob("runs/*.tmp")) and not list(out.rglob("*.json.tmp"))
    assert len(list(out.glob("runs/*/row.json"))) == 1  # killed between the two configurations
    r = run_main(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "already done" in r.stdout and not r.stdout.startswith("2 configurations, 0 already done")
    assert rows(out) == rows(tmp_path / "a")


@pytest.mark.parametrize("flags,message", [
    (["--method", "sgd"], "unknown method 'sgd'"),
    (["--split", "forget50"], "unknown split 'forget50'"),
    (["--method", "npo", "--grid", "0.5,0"], "npo rejects beta = 0"),
    (["--method", "wga", "--grid", "-1"], "wga rejects alpha = -1"),
    (["--method", "rmu", "--rmu-layers", "2,9"], "RMU layer 9 is out of range"),
    (["--method", "npo", "--grid", "0.5,x"], "comma-separated numbers"),
    (["--split", "all", "--retain-stats", "s.json"], "put {split} in"),
    (["--max-samples", "0"], "--max-samples must be >= 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--shard", "2/2"], "--shard takes i/N with 0 <= i < N, e.g. 0/4; got '2/2'"),
    (["--claim-timeout", "0"], "--claim-timeout must be positive, got 0"),
    (["--lora-r", "8", "--attacks"], "--attacks is for full fine-tuning sweeps"),
    (["--attacks", "--no-table1"], "--attacks adds columns to Table 1: it needs Table 1"),
    (["--attacks", "--relearn-steps", "5,2"], "--relearn-steps must be positive whole numbers in increasing order"),
])
def test_bad_input_writes_nothing(tmp_path, flags, message):
    out = tmp_path / "sw"
    r = run_main("sweep.py", *flags, "--out", str(out))
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_rmu_layers_scale_the_papers_11_22_33_of_33():
    assert sweep.rmu_layers(32) == dict(shallow=10, middle=21, deep=32)  # Llama-2-7B: the paper's own
    assert sweep.rmu_layers(24) == dict(shallow=7, middle=16, deep=24)  # phi-1.5
    assert sweep.rmu_layers(6) == dict(shallow=1, middle=4, deep=6)  # the tiny preset


def test_grid_is_the_papers():
    import argparse
    a = argparse.Namespace(grid=None, wtnpo_alpha=None, rmu_layers=None)
    layers = sweep.rmu_layers(6)
    assert [p["alpha"] for p in sweep.grid("wga", a, layers)] == [0.05, 0.1, 0.5, 0.7, 1, 2, 4, 5, 7, 10]
    assert len(sweep.grid("wtnpo", a, layers)) == 30 and sweep.grid("ga", a, layers) == [{}]
    rmu = sweep.grid("rmu", a, layers)
    assert len(rmu) == 21 and {p["layer"] for p in rmu} == {1, 4, 6} and {p["c"] for p in rmu} == {0, 1, 2, 4, 5, 7, 10}
    a.grid = (2.0, 3.0)
    assert sweep.grid("npo", a, layers) == [{"beta": 2.0}, {"beta": 3.0}]


def test_rank_breaks_ties_on_es_perturb_then_retain_then_the_value():
    def row(u, p, r, beta):
        return dict(es_exact_unlearn=u, es_perturb_unlearn=p, es_exact_retain=r, params=dict(beta=beta))
    rows_ = [row(0.1, 0.3, 0.9, 1.0), row(0.1, 0.2, 0.9, 2.0), row(0.2, 0.0, 1.0, 0.5)]
    assert min(rows_, key=sweep.rank) is rows_[1]
    ties = [row(0.1, 0.2, 0.9, 4.0), row(0.1, 0.2, 0.95, 5.0), row(0.1, 0.2, 0.95, 0.7)]
    assert min(ties, key=sweep.rank) is ties[2] and min(ties[::-1], key=sweep.rank) is ties[2]


def test_mixing_in_memory_equals_mixing_the_saved_folders(tmp_path, tiny_path):
    import common
    r = run_main("ga.py", "--max-steps", "2", "--lr", "0.01", "--no-eval", "--out", str(tmp_path / "ga"))
    assert r.returncode == 0, r.stderr
    a, b = common.load_model(tiny_path, frozen=True), common.load_model(tiny_path, frozen=True)
    theta_o = common.load_model(tiny_path, frozen=True).state_dict()
    theta_u = common.load_model(str(tmp_path / "ga"), frozen=True).state_dict()
    files_o, files_u = uwc.safetensors_files(tiny_path), uwc.safetensors_files(str(tmp_path / "ga"))
    for lam in (0.0, 0.37, 1.0):
        uwc.mix_(a, files_o, files_u, lam)
        uwc.mix_state_(b, theta_o, theta_u, lam)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert any(not torch.equal(x, y) for x, y in zip(theta_o.values(), theta_u.values()))


def test_no_save_keeps_the_logs_without_the_weights(tmp_path):
    out = tmp_path / "run"
    r = run_main("ga.py", "--max-steps", "2", "--no-eval", "--no-save", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {"args.json", "log.jsonl", "summary.json", "run.json"}
    assert len(open(out / "log.jsonl").read().splitlines()) == 2 and not (tmp_path / "run.tmp").exists()


def test_every_split_starts_from_the_original_weights(tmp_path):
    """A split first met after another split's configurations is scored on theta_o, not on what the
    model held last (the before-unlearning row and UWC's target come from it)."""
    import argparse
    args = argparse.Namespace(model="tiny", data=None, tol=None, batch_size=64, es_eos=False, seed=0, lr=None,
                              epochs=None, keep=False, grid=None, wtnpo_alpha=None, rmu_layers=None,
                              min_forget_es=0.3)
    sw = sweep.Sweep(args)
    sw.runs = tmp_path
    row = sw.config("ga", "forget01", {})
    assert row["es_exact_unlearn"] < sw.split("forget01")["before"]["es_exact_unlearn"]
    assert sw.split("forget05")["before"] == sweep.Sweep(args).split("forget05")["before"]


def test_table1_after_a_grid_run_earlier_keeps_its_rows(tmp_path):
    """Table 1 of a pick made by an earlier run unlearns it again, beside its row, never over it."""
    out = tmp_path / "sw"
    common = ["sweep.py", "--method", "ga", "--split", "forget01", "--out", str(out)]
    assert run_main(*common, "--no-table1").returncode == 0
    first = rows(out)
    r = run_main(*common, "--seeds", "1", "--retain-stats", retain_stats(tmp_path / "stats.json"),
                 "--max-samples", "20", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "1 configurations, 1 already done" in r.stdout and rows(out) == first
    assert (out / "runs" / "ga-forget01" / "row.json").is_file() and not (out / "scratch").exists()
    t1 = json.load(open(out / "table1.json"))["rows"]
    assert t1[1]["method"] == "ga" and t1[1]["es_exact_unlearn"] == first[0]["es_exact_unlearn"]  # lam* 1 here


def test_seeds_give_table1_its_means_and_spreads(tmp_path):
    """--seeds 2: the pick is run again with seed 1; its Table 1 row is eval_tofu.py on that unmixed
    model and its after-UWC row uwc.py on it, and each cell holds both seeds' values, their mean and
    range. The grid ran with seed 0 only."""
    stats = retain_stats(tmp_path / "stats-forget01.json")
    out = tmp_path / "sw"
    r = run_main("sweep.py", "--method", "wga", "--split", "forget01", "--grid", "5", "--tol", "0.02", "--seeds", "2",
                 "--keep", "--retain-stats", str(tmp_path / "stats-{split}.json"), "--max-samples", "20",
                 "--max-new-tokens", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "(unlearning seeds 0, 1)" in r.stdout and len(rows(out)) == 1
    prof = json.load(open(out / "profile.json"))  # where the time went: every phase this run went through
    assert prof["units"] == {"grid": 1, "table1": 3}
    assert {"grid: unlearning", "UWC: the search for lambda*", "UWC: the four ES at lambda*",
            "Table 1: unlearning the picks again", "Table 1: full evaluation (ES, MU, FQ)"} <= set(prof["phases"])
    assert "attacks" not in prof["phases"] and prof["phases"]["grid: unlearning"] > 0
    assert sum(prof["phases"].values()) + prof["other"] == pytest.approx(prof["wall_seconds"], abs=0.5)
    t1 = json.load(open(out / "table1.json"))
    assert t1["seeds"] == [0, 1] and [(x["method"], x.get("seed")) for x in t1["rows"]] == [
        (None, None), ("wga", 0), ("wga", 1)]
    seed1 = out / "runs" / (sweep.name_of("wga", "forget01", {"alpha": 5.0}) + "-seed1")
    assert json.load(open(seed1 / "args.json"))["seed"] == 1
    r = run_main("eval_tofu.py", "--model", str(seed1), "--split", "forget01", "--retain-stats", stats,
                 "--max-samples", "20", "--max-new-tokens", "4", "--out", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr
    summary = json.load(open(tmp_path / "eval.json"))["summary"]
    row0, row1 = t1["rows"][1], t1["rows"][2]
    for k in SCORES + ("model_utility", "log10_forget_quality"):
        assert row1[k] == pytest.approx(summary[k], abs=1e-12), k
    r = run_main("uwc.py", "--model", str(seed1), "--split", "forget01", "--tol", "0.02", "--retain-stats", stats,
                 "--max-samples", "1")  # its search on all held-out rows; its own evaluation is not compared
    assert r.returncode == 0, r.stderr
    mixed = tmp_path / "sw" / "runs" / (seed1.name + "-uwc")
    want = four_es(mixed, "forget01")
    assert row1["uwc"]["lam"] == json.load(open(mixed / "uwc.json"))["lam"]
    assert all(row1["uwc"][k] == want[k] for k in SCORES)
    assert row0["uwc"]["es_exact_unlearn"] == rows(out)[0]["es_exact_unlearn"]  # seed 0: the grid's own row
    assert row0["model_utility"] != row1["model_utility"]  # another seed, another model
    cell = next(c for c in t1["cells"] if c["method"] == "wga")
    x = [row0["es_exact_retain"], row1["es_exact_retain"]]
    st = cell["unmixed"]["es_exact_retain"]
    assert st["values"] == x and st["mean"] == pytest.approx((x[0] + x[1]) / 2)
    assert st["sd"] == pytest.approx(abs(x[0] - x[1]) / 2 ** 0.5) and (st["min"], st["max"]) == (min(x), max(x))
    md = (out / "table1.md").read_text()
    assert f"| {st['mean']:.4f} [{min(x):.4f}, {max(x):.4f}] |" in md and "unlearning seeds 0, 1" in md


def test_beyond_noise_needs_ranges_that_do_not_overlap():
    assert sweep.beyond_noise([0.5, 0.6, 0.7], [0.1, 0.2, 0.49]) == 1
    assert sweep.beyond_noise([0.1, 0.2, 0.3], [0.31, 0.9, 0.5]) == -1
    assert sweep.beyond_noise([0.1, 0.5, 0.3], [0.4, 0.9, 0.6]) == 0  # 0.5 above 0.4: overlapping
    assert sweep.beyond_noise([0.2, 0.3], [0.3, 0.4]) == 0  # a shared value is no difference
    assert sweep.beyond_noise([None, 0.1], [0.5, 0.6]) == 0  # an FQ below -300 is not a number to compare


def test_cells_show_the_range_below_five_seeds_and_the_sd_from_five():
    assert sweep.fmt_cell(sweep.stats([0.1, 0.3, 0.2])) == "0.2000 [0.1000, 0.3000]"
    st = sweep.stats([0.1, 0.3, 0.2, 0.4, 0.5])
    assert sweep.fmt_cell(st) == f"0.3000 ± {0.1581:.4f}" and st["sd"] == pytest.approx(0.158113883)
    assert sweep.fmt_cell(sweep.stats([0.25])) == "0.2500"
    assert sweep.fmt_cell(sweep.stats([None, -2.0, None], below=2)) == "< -300 in 2 of 3 seeds"


def test_grids_of_the_four_objectives_after_the_papers_seven():
    import argparse
    a = argparse.Namespace(grid=None, wtnpo_alpha=None, rmu_layers=None)
    layers = sweep.rmu_layers(6)
    assert sweep.METHODS[7:] == ("simnpo", "satimp", "idkdpo", "undial")  # --method all: Table 1's order
    simnpo = sweep.grid("simnpo", a, layers)
    assert len(simnpo) == 20 and {(p["beta"], p["gamma"]) for p in simnpo} == {(b, g) for b in sweep.GRID
                                                                               for g in (0, 1)}
    satimp = sweep.grid("satimp", a, layers)
    assert {(p["beta1"], p["beta2"]) for p in satimp} == {(b1, b2) for b1 in (1, 3, 5) for b2 in (0.1, 0.5, 1)}
    assert [p["beta"] for p in sweep.grid("idkdpo", a, layers)] == list(sweep.GRID)
    assert [p["beta"] for p in sweep.grid("undial", a, layers)] == [1, 3, 10, 30, 100]
    a.grid = (2.0,)  # --grid replaces SimNPO's beta and SatImp's beta1; gamma and beta2 keep their grids
    assert sweep.grid("simnpo", a, layers) == [{"beta": 2.0, "gamma": 0.0}, {"beta": 2.0, "gamma": 1.0}]
    assert len(sweep.grid("satimp", a, layers)) == 3
    with pytest.raises(sweep.common.UsageError, match="satimp rejects beta1 = -1"):
        sweep.check_params("satimp", {"beta1": -1.0, "beta2": 0.1}, 6)


def test_a_sweep_of_one_of_the_four(tmp_path):
    """UNDIAL, one value, forget01: the row, its run's flags, the tuning table and the pick beside the default."""
    out = tmp_path / "sw"
    r = run_main("sweep.py", "--method", "undial", "--split", "forget01", "--grid", "10", "--no-table1",
                 "--out", str(out))
    assert r.returncode == 0, r.stderr
    (row,) = rows(out)
    assert row["method"] == "undial" and row["params"] == {"beta": 10.0} and 0 <= row["lam"] <= 1
    assert all(0 <= row[k] <= 1 for k in SCORES)
    args = json.load(open(out / "runs" / "undial-forget01-beta10" / "args.json"))
    assert args["beta"] == 10.0 and args["reg"] == "kl" and args["split"] == "forget01"
    sw = json.load(open(out / "sweep.json"))
    assert sw["best"]["undial/forget01"]["paper_default"] == {"beta": 10.0}
    tables = (out / "tables.md").read_text()
    assert "## UNDIAL\n" in tables and "| forget01 | 10 |" in tables and "| forget01 | UNDIAL | beta 10 |" in tables
    assert (out / "tuning-undial.png").stat().st_size > 10_000


def test_attacks_are_attack_py_and_eval_tofu_py_on_the_pick(tmp_path, tiny_path):
    """--attacks after a sweep made Table 1: its rows stay as they were, and each attack row is attack.py on the
    kept pick (relearning on forget01's one author halved, the control, 4 bits) and eval_tofu.py's PrivLeak; the
    columns and the figure come from them. A copy of the target model stands in for the retain-only model (the
    real retain99 takes minutes to fine-tune on first use)."""
    import shutil
    stand_in = str(shutil.copytree(tiny_path, tmp_path / "retain-only"))
    out = tmp_path / "sw"
    base = ["sweep.py", "--method", "ga", "--split", "forget01", "--seeds", "1", "--keep", "--retain-model", stand_in,
            "--max-samples", "20", "--max-new-tokens", "4", "--out", str(out)]
    assert run_main(*base).returncode == 0
    t1 = (out / "table1" / "forget01-ga-seed0.json").read_bytes()
    r = run_main(*base, "--attacks", "--relearn-steps", "1,3")
    assert r.returncode == 0, r.stderr
    assert (out / "table1" / "forget01-ga-seed0.json").read_bytes() == t1
    att = json.load(open(out / "table1" / "forget01-ga-seed0-attacks.json"))
    control = json.load(open(out / "table1" / "forget01-control-attacks.json"))
    assert control["on"] == "same-authors" and [x["steps"] for x in att["relearn"]] == [1, 3]
    r = run_main("attack.py", "--model", str(out / "runs" / "ga-forget01"), "--retain-model", stand_in,
                 "--relearn-on", "same-authors", "--relearn-steps", "1,3", "--quant-bits", "4", "--max-samples", "20",
                 "--out", str(tmp_path / "attack.json"))
    assert r.returncode == 0, r.stderr
    ref = json.load(open(tmp_path / "attack.json"))
    keys = ("es_exact_v", "es_perturb_v", "es_exact_retain", "auc_min_k_pp_v")
    relearnt = [a for a in ref["attacks"] if a["attack"] == "relearn"]
    for mine, theirs in zip(att["relearn"], relearnt):
        for k in keys:
            assert mine[k] == pytest.approx(theirs[k], abs=1e-9) and control["relearn"][relearnt.index(theirs)][
                k] == pytest.approx(theirs[f"control_{k}"], abs=1e-9), k
    assert att["before_v"]["es_exact_v"] == pytest.approx(ref["before"]["unlearned"]["es_exact_v"], abs=1e-9)
    (quant,) = [a for a in ref["attacks"] if a["attack"] == "quantize"]
    for k in ("es_exact_unlearn", "es_perturb_unlearn", "es_exact_retain"):
        assert att["quant4"][k] == pytest.approx(quant[k], abs=1e-9), k
    r = run_main("eval_tofu.py", "--model", str(out / "runs" / "ga-forget01"), "--retain-model", stand_in,
                 "--max-samples", "20", "--max-new-tokens", "4", "--out", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr
    ev = json.load(open(tmp_path / "eval.json"))
    assert att["privleak"] == pytest.approx(ev["privleak"], abs=1e-9) and att["privleak"] != 0
    cell = [c for c in json.load(open(out / "table1.json"))["cells"] if c["method"] == "ga"][0]["attacks"]
    assert cell["relearn_es_exact_v"]["mean"] == att["relearn"][-1]["es_exact_v"]
    assert cell["quant4_es_exact_unlearn"]["mean"] == att["quant4"]["es_exact_unlearn"]
    assert "| ES-exact V relearnt ↓ | ES-exact 4-bit ↓ | PrivLeak → 0 |" in (out / "table1.md").read_text()
    assert (out / "table1-relearn.png").stat().st_size > 0
