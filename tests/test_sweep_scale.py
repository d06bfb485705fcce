"""sweep.py at scale: shards sharing one folder (two at once equal one process bit for bit, a killed shard is
retaken, the claims' rules, --tables) and LoRA sweeps (a configuration equals the script with --lora-r and uwc.py;
fresh adapters per configuration on untouched weights)."""
import json
import subprocess
import sys
import time

import pytest
import torch

import sweep
import uwc
from conftest import ROOT, run_main
from test_sweep import QA, SCORES, retain_stats, rows

# ---- shards: several processes share one folder

SHARDED = ["sweep.py", "--method", "wga", "--split", "forget01", "--grid", "1,5", "--tol", "0.02", "--seeds", "1",
           "--max-samples", "5", "--max-new-tokens", "4"]


def one_thread():
    import os
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def table1_rows(folder):
    return json.load(open(folder / "table1.json"))["rows"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The sharded tests' sweep in one process with one thread: the rows the shards must give, bit for bit."""
    root = tmp_path_factory.mktemp("one")
    stats = retain_stats(root / "stats.json")
    r = subprocess.run([sys.executable, *SHARDED, "--retain-stats", stats, "--out", str(root / "sw")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=one_thread())
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "sw", stats


def test_two_shards_at_once_equal_one_process(one_process, tmp_path):
    folder, stats = one_process
    out = tmp_path / "sw"
    ps = [subprocess.Popen([sys.executable, *SHARDED, "--retain-stats", stats, "--out", str(out), "--shard", f"{i}/2"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_thread())
          for i in range(2)]
    res = [p.communicate(timeout=600) for p in ps]
    assert [p.returncode for p in ps] == [0, 0], [e[-2000:] for _, e in res]
    ran = [o.count(": λ* ") for o, _ in res]  # the configurations each shard ran
    assert sum(ran) == 2 and min(ran) >= 1, ran  # each ran one, none twice
    assert rows(out) == rows(folder) and table1_rows(out) == table1_rows(folder)
    assert not list((out / "claims").iterdir())


def test_a_shard_killed_mid_configuration_is_retaken(one_process, tmp_path):
    """SIGKILL leaves the shard's claim and half-written run folder (or, killed between a row and its release, a
    claim of a finished unit); started again on the same host, the shard finds the claim's process gone, retakes
    it, and the rows are the one process's; once every unit is done no claim is left."""
    folder, stats = one_process
    out = tmp_path / "sw"
    cmd = [sys.executable, *SHARDED, "--retain-stats", stats, "--out", str(out), "--shard", "0/2"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=one_thread())
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (
            list(out.glob("runs/*/row.json")) and list(out.glob("claims/wga-*.claim"))):
        time.sleep(0.02)  # its second configuration has started
    p.kill()
    p.wait(timeout=60)
    claimed = [f.name for f in out.glob("claims/wga-*.claim")]
    assert len(claimed) == 1 and len(list(out.glob("runs/*/row.json"))) == 1, claimed
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=one_thread())
    assert r.returncode == 0, r.stderr[-3000:]
    assert rows(out) == rows(folder) and table1_rows(out) == table1_rows(folder)
    assert not list((out / "claims").iterdir())


def test_claims(tmp_path):
    """A claim is taken once; another host's is retaken only once older than the timeout; one of this host's only
    when its process is gone; a released claim can be taken again."""
    import os
    import socket
    c = sweep.Claims(tmp_path, timeout=100)
    assert c.take("a") and not c.take("a")  # ours: not retaken by ourselves either
    c.release("a")
    assert c.take("a")
    write = lambda name, host, pid, age: (
        (tmp_path / f"{name}.claim").write_text(json.dumps(dict(host=host, pid=pid, time=0))),
        os.utime(tmp_path / f"{name}.claim", (time.time() - age,) * 2))
    write("b", "elsewhere", 1, 50)
    write("c", "elsewhere", 1, 150)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write("d", socket.gethostname(), dead.pid, 0)
    write("e", socket.gethostname(), os.getppid(), 0)
    (tmp_path / "f.claim").write_text("")  # a process killed while writing its claim
    os.utime(tmp_path / "f.claim", (time.time() - 20,) * 2)
    assert [c.take(x) for x in "bcdef"] == [False, True, True, False, True]
    assert json.loads((tmp_path / "c.claim").read_text())["pid"] == os.getpid()
    c.release_all()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.claim", "e.claim"]


def test_tables_from_the_rows_on_disk(one_process, tmp_path):
    """--tables runs nothing and makes the outputs again from the rows on disk."""
    import shutil
    folder, stats = one_process
    out = shutil.copytree(folder, tmp_path / "sw")
    for f in ("sweep.json", "tables.md", "table1.json", "table1.md"):
        (out / f).unlink()
    r = run_main(*SHARDED, "--retain-stats", stats, "--out", str(out), "--tables")
    assert r.returncode == 0, r.stderr
    assert rows(out) == rows(folder) and table1_rows(out) == table1_rows(folder)
    assert (out / "table1.md").read_text() == (folder / "table1.md").read_text()


def test_a_lora_configuration_is_the_script_and_uwc_scaling_its_adapter(tmp_path, tiny_path):
    """--lora-r 8: one configuration gives exactly the lam* of ga.py --lora-r 8 followed by uwc.py (which scales
    the run's adapter), and its four ES values are those of theta_o with that adapter scaled by lam*, computed here
    from the run folder's saved adapter."""
    r = run_main("sweep.py", "--method", "ga", "--split", "forget01", "--tol", "0", "--no-table1", "--lora-r", "8",
                 "--out", str(tmp_path / "sw"))
    assert r.returncode == 0, r.stderr
    (row,) = rows(tmp_path / "sw")
    assert 0 < row["lam"] < 1 and json.load(open(tmp_path / "sw" / "sweep.json"))["settings"]["lora_r"] == 8
    r = run_main("ga.py", "--split", "forget01", "--reg", "kl", "--no-eval", "--lora-r", "8", "--out", str(tmp_path / "ga"))
    assert r.returncode == 0, r.stderr
    r = run_main("uwc.py", "--model", str(tmp_path / "ga"), "--split", "forget01", "--tol", "0",
                 "--retain-stats", retain_stats(tmp_path / "stats.json"), "--max-samples", "1")
    assert r.returncode == 0, r.stderr
    assert row["lam"] == json.load(open(tmp_path / "ga-uwc" / "uwc.json"))["lam"]
    import common
    import eval_tofu
    from peft import PeftModel
    model = PeftModel.from_pretrained(common.load_model(tiny_path, frozen=True), str(tmp_path / "ga" / "adapter"))
    uwc.scale_adapter(model)(row["lam"])
    tok = common.load_tokenizer(tiny_path)
    d, sets = common.split_data("forget01"), eval_tofu.load_sets("forget01", "builtin")
    es = lambda rows, q="question": sum(eval_tofu.es_exact(model.eval(), tok, rows, QA, question=q)) / len(rows)
    want = dict(es_exact_retain=es(d["retain_eval"]), es_exact_unlearn=es(d["forget"]),
                es_perturb_retain=es(sets["retain"][1], "paraphrased_question"),
                es_perturb_unlearn=es(sets["forget"][1], "paraphrased_question"))
    for k in SCORES:
        assert row[k] == want[k], k


def test_lora_configurations_start_from_fresh_adapters_on_untouched_weights(tmp_path, tiny_path):
    """Each LoRA configuration gets new adapters made with its seed: the same configuration twice gives the same
    row, another seed another adapter; the base weights stay the original's throughout, and a split's row before
    unlearning is theta_o's (the full sweep's)."""
    import argparse
    import common
    args = argparse.Namespace(model="tiny", data=None, tol=None, batch_size=64, es_eos=False, seed=0, lr=None,
                              epochs=None, keep=False, grid=None, wtnpo_alpha=None, rmu_layers=None,
                              min_forget_es=0.3, lora_r=4, lora_alpha=32)
    sw = sweep.Sweep(args)
    sw.runs = tmp_path
    first, again = sw.config("npo", "forget01", {"beta": 0.5}), sw.config("npo", "forget01", {"beta": 0.5})
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("seconds")}
    assert drop(first) == drop(again) and first["es_exact_unlearn"] < sw.split("forget01")["before"]["es_exact_unlearn"]
    a = sw.weights()
    sw.unlearn("npo", "forget01", {"beta": 0.5}, tmp_path / "seed1", keep=False, seed=1)
    b = sw.weights()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    base = common.load_model(tiny_path, frozen=True).state_dict()
    for k, v in sw.model.get_base_model().state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    full = sweep.Sweep(argparse.Namespace(**{**vars(args), "lora_r": 0}))
    assert sw.split("forget01")["before"] == full.split("forget01")["before"]
