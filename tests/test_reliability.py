"""Faults and reproducibility: a NaN stops the run, SIGTERM leaves no model, a seed repeats a run."""
import json
import signal
import subprocess
import sys
import time

from conftest import ROOT, run_script


def test_nan_stops_the_run_and_saves_nothing(tiny_path, tmp_path):
    out = tmp_path / "run"
    r = run_script("ga.py", "--lr", "1e30", "--reg", "none", "--max-steps", "6", "--no-eval", "--out", str(out))
    assert r.returncode == 1 and "non-finite loss or gradient at step 2" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    assert [json.loads(x)["step"] for x in open(tmp_path / "run.tmp" / "log.jsonl")] == [1]


def test_sigterm_leaves_no_model(tiny_path, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "npo.py", "--epochs", "500", "--no-eval", "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run.tmp" / "log.jsonl"
    t0 = time.time()
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() - t0 < 120:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "run.tmp" / "model.safetensors").exists()


def test_same_seed_same_run(tiny_path, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        r = run_script("wtnpo.py", "--max-steps", "4", "--batch-size", "8", "--seed", "3", "--no-eval", "--out",
                       str(out))
        assert r.returncode == 0, r.stderr
        log = [json.loads(x) for x in open(out / "log.jsonl")]
        runs.append(([{k: v for k, v in row.items() if k != "tok_s"} for row in log],
                     (out / "model.safetensors").read_bytes(), json.load(open(out / "args.json"))))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]  # every logged number but the speed; the weights
    args = runs[0][2]
    assert args["seed"] == 3 and args["torch"] and args["transformers"] and "wtnpo.py" in args["command"]
    r = run_script("wtnpo.py", "--max-steps", "4", "--batch-size", "8", "--seed", "4", "--no-eval", "--out",
                   str(tmp_path / "c"))
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != runs[0][1]
