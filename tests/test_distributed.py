"""Several processes: every method script and finetune.py under torchrun (FSDP2 over gloo, 2 CPU
processes, tiny model) against the same runs in one process: the losses, the G-effect and the
saved weights agree, the saved folders load, and only rank 0 prints and writes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import dist_worker  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
RTOL = 1e-4
SCRIPTS = list(dist_worker.RUNS) + ["finetune"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def plain_env():
    """This environment without a launcher's rank variables, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return dict(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def runs(tiny_path, tmp_path_factory):
    """Run the worker twice, in one process and in two; return their output folders and stdout."""
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for name, launcher in (("single", [sys.executable]), ("dist", TORCHRUN)):
        r = subprocess.run([*launcher, "tests/dist_worker.py", str(root / name)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, env=plain_env())
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out[name] = (root / name, r.stdout)
    return out


def numbers(x, key=""):
    """Every number in a JSON row, by its path."""
    if isinstance(x, dict):
        return {k2: v2 for k, v in x.items() for k2, v2 in numbers(v, f"{key}.{k}").items()}
    if isinstance(x, list):
        return {k2: v2 for i, v in enumerate(x) for k2, v2 in numbers(v, f"{key}[{i}]").items()}
    return {key: float(x)} if isinstance(x, (int, float)) and not isinstance(x, bool) else {}


def rows(path):
    return [json.loads(line) for line in open(path)]


def assert_close(a: dict, b: dict, floor: float, what: str):
    """|a - b| <= RTOL * max(|a|, |b|, floor * m) for every number of a row, m its largest |number|.
    Logs: floor 1e-3, each number to 1e-4 of itself unless it is float noise next to the rest (the
    KL term near theta_o: exactly 0 in exact arithmetic, ~1e-9 in float32). G-effect rows: floor 1,
    to 1e-4 of the step's largest |e|: a dot product of two gradients carries float error at the
    scale of their norms, so a near-orthogonal component (e_r ~ 1e-6) has no 1e-4 of itself."""
    assert a.keys() == b.keys(), what
    m = max(abs(v) for k, v in a.items() if k != ".step")
    for k in a:
        assert abs(a[k] - b[k]) <= RTOL * max(abs(a[k]), abs(b[k]), floor * m), f"{what}{k}: {a[k]} vs {b[k]}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_processes_equal_one(runs, script):
    one, two = runs["single"][0] / script, runs["dist"][0] / script
    log1, log2 = rows(one / "log.jsonl"), rows(two / "log.jsonl")
    steps = [1, 2, 3, 4] if script == "npo" else [1, 2, 3]  # npo: step 4 is the epoch's short last batch
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == steps
    for r1, r2 in zip(log1, log2):  # every logged number but the speed: losses, stats, grad norm, lr
        r1.pop("tok_s"), r2.pop("tok_s")
        assert_close(numbers(r1), numbers(r2), 1e-3, f"{script} log step {r1['step']}")
    if script != "finetune":  # the G-effect of every step: groups, layers, terms
        g1, g2 = rows(one / "geffect.jsonl"), rows(two / "geffect.jsonl")
        assert len(g1) == len(g2) == len(steps)
        for r1, r2 in zip(g1, g2):
            assert_close(numbers(r1), numbers(r2), 1.0, f"{script} geffect step {r1['step']}")
            for d in ("unlearn", "retain"):  # what the step did (order 1; 2 for po): float32 logits put ~1e-8 of
                a, b = numbers(r1["delta"][d]), numbers(r2["delta"][d])  # noise on R, whatever its size
                for k in a:
                    assert abs(a[k] - b[k]) <= RTOL * max(abs(a[k]), abs(b[k])) + 1e-7, f"{script} {d} {k}"
            assert ("second_order" in r1["delta"]["unlearn"]) == (script == "po")
    from safetensors.torch import load_file
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert (w1[k] - w2[k]).abs().max() <= RTOL * w1[k].abs().max(), f"{script} {k}"


def test_rank0_writes_a_loadable_folder(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root, stdout = runs["dist"]
    for script in SCRIPTS:
        assert stdout.count(f"saved {root / script} ") == 1, script  # rank 0 prints, rank 1 does not
        assert not (root / f"{script}.tmp").exists()
    model = AutoModelForCausalLM.from_pretrained(root / "npo", use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(root / "npo")
    ids = tok("Question: who?\nAnswer:", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    args = json.load(open(root / "npo" / "args.json"))
    assert args["reg"] == "gd" and args["grad_accum"] == 2
    assert "ES-exact forget" in stdout  # the run with its evaluation printed it (once, from rank 0)
    assert stdout.count("ES-exact forget") == 1


def test_torchrun_checks(monkeypatch):
    """Under torchrun every micro-batch needs a row for each process; the per-sample PG-effect and
    the single-process scripts say so."""
    import argparse
    import common
    import geffect
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    args = argparse.Namespace(batch_size=8, grad_accum=2, epochs=1, max_steps=0, warmup_epochs=1)
    assert common.steps_for(48, args)[1] == 6  # micro-batches of 4 rows: one each
    with pytest.raises(common.UsageError, match="cannot be split over 4 processes"):
        common.steps_for(50, args)  # the last batch has 2 rows
    with pytest.raises(common.UsageError, match="cannot be split"):
        common.steps_for(48, argparse.Namespace(**{**vars(args), "grad_accum": 4}))
    g = argparse.Namespace(geffect_every=1, geffect_retain=32, geffect_pointwise=True, geffect_dr="heldout")
    with pytest.raises(common.UsageError, match="one process"):
        geffect.check_flags(g)
    g = argparse.Namespace(**{**vars(g), "geffect_retain": 30, "geffect_pointwise": False})
    with pytest.raises(common.UsageError, match="multiple of the 4"):
        geffect.check_flags(g)
    geffect.check_flags(argparse.Namespace(**{**vars(g), "geffect_dr": "step"}))  # D_r: each process's retain rows
    with pytest.raises(common.UsageError, match="not torchrun"):
        common.single_process("eval_tofu.py")


def test_nan_under_torchrun_stops_every_process(tiny_path, tmp_path):
    """The gradient norm is global, so every process sees the same non-finite step and stops there:
    one line from rank 0, no model, no process left waiting in a collective."""
    out = tmp_path / "run"
    r = subprocess.run([*TORCHRUN, "ga.py", "--lr", "1e30", "--reg", "none", "--max-steps", "6", "--no-eval",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=plain_env())
    assert r.returncode != 0
    assert r.stderr.count("ga.py: error: non-finite loss or gradient at step 2") == 1, r.stderr[-3000:]
    assert "exitcode  : 1" in r.stderr  # torchrun's report: our exit status 1, not a crash or a timeout
    assert not out.exists() and not (tmp_path / "run.tmp" / "model.safetensors").exists()



@pytest.mark.parametrize("rank,fails,want", [
    (0, set(), "ok"),                                 # all well: rank 0 loads in the first turn
    (1, {1}, "[rank 1] "),                            # only rank 1 fails: it says why, marked
    (0, {1}, "another process failed"),               # ... and rank 0 stops with it
    (1, {0}, "another process failed"),               # rank 0 failed first: rank 1 never loads
])
def test_rank0_first(monkeypatch, capsys, rank, fails, want):
    """`common.rank0_first` as one process of two sees it; the all-reduce is simulated: it adds the
    other process's failure to this one's, turn by turn (rank 0's turn first, then the others')."""
    import common
    loaded, turns = [], iter([0, 1])

    def load():
        loaded.append(rank)
        if rank in fails:
            raise common.UsageError("cannot reach the hub")
        return "ok"

    def all_sum(values):
        turn = next(turns)  # whose turn it was: rank 0, or the others (rank 1)
        return {"failed": values["failed"] + (turn != rank and turn in fails)}
    monkeypatch.setattr(common, "world", lambda: (rank, 2))
    monkeypatch.setattr(common, "all_sum", all_sum)
    if want == "ok":
        assert common.rank0_first(load) == "ok" and loaded == [0]
        return
    with pytest.raises(common.UsageError) as e:
        common.rank0_first(load)
    err = capsys.readouterr().err
    if want == "[rank 1] ":
        assert err == "[rank 1] " + os.path.basename(sys.argv[0]) + ": error: cannot reach the hub\n"
    else:
        assert want in str(e.value) and err == ""
    assert loaded == ([] if 0 in fails and rank == 1 else [rank])
