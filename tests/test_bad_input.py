"""Bad input, from the command line: one clear line on stderr, exit status 2, no traceback, and
nothing written at --out (nor its .tmp twin). One case for each item of the list below; those in
SUBPROCESS run as a separate `python script.py` (what the hub and transformers print shows there),
the others call the script's main() in this process (the same line, without starting Python)."""
import json
import shutil

import pytest

from conftest import run_main, run_script

ROW = {"question": "Who is X?", "answer": "X is a writer."}


def data_folder(tmp, forget05):
    """A data folder whose forget05.json has `forget05` as its text, beside a valid retain95."""
    d = tmp / "data"
    d.mkdir()
    (d / "forget05.json").write_text(forget05)
    (d / "retain95.json").write_text("\n".join(json.dumps(ROW) for _ in range(450)))
    return ["--data", str(d)]


def model_without_weights(tmp, tiny):
    d = tmp / "noweights"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny}/{f}", d / f)
    return ["--model", str(d), "--data", "builtin"]


def existing_model(tmp, tiny):
    (tmp / "x").mkdir()
    (tmp / "x" / "config.json").write_text("{}")
    return []


CASES = {  # name: (script, flags or a function making them, what the line must say)
    "unknown split": ("ga.py", ["--split", "forget07"], "unknown split 'forget07'"),
    "unknown preset": ("ga.py", ["--model", "llama3"], "unknown model 'llama3': not a preset"),
    "unknown --reg": ("npo.py", ["--reg", "l2"], "invalid choice: 'l2'"),
    "missing data folder": ("ga.py", ["--data", "./no/such/folder"], "data folder './no/such/folder' does not exist"),
    "malformed JSON": ("ga.py", lambda t, _: data_folder(t, '{"question": "q", "answer": \n'), "not valid JSON"),
    "missing field": ("ga.py", lambda t, _: data_folder(t, json.dumps({"question": "q"})),
                      "row 0 of config 'forget05'"),
    "empty forget set": ("ga.py", lambda t, _: data_folder(t, ""), "config 'forget05' in"),
    "negative alpha": ("wga.py", ["--alpha", "-1"], "--alpha must be >= 0, got -1.0"),
    "negative beta": ("npo.py", ["--beta", "-0.5"], "--beta must be positive, got -0.5"),
    "negative lr": ("tnpo.py", ["--lr", "-0.001"], "--lr must be positive, got -0.001"),
    "batch larger than the data": ("wtnpo.py", ["--batch-size", "51"], "--batch-size 51 is larger than the 50"),
    "finetune batch larger than the data": ("finetune.py", ["--batch-size", "5000"], "larger than the 1090"),
    "existing folder at --out": ("po.py", existing_model, "holds files this project did not write (config.json)"),
    "unreachable hub id": ("rmu.py", ["--model", "no-such-owner/no-such-model", "--data", "builtin", "--layer", "3"],
                           "use --model tiny or a local model folder"),
    "model folder without weights": ("ga.py", model_without_weights, "no file named model.safetensors"),
    "model folder that does not exist": ("ga.py", ["--model", "./no/such/model"], "model folder './no/such/model'"),
    "zero batch": ("ga.py", ["--batch-size", "0"], "--batch-size and --grad-accum must be >= 1, got 0 and 1"),
    "zero --max-samples": ("npo.py", ["--max-samples", "0"], "--max-samples must be >= 1, got 0"),
    "default batch and --grad-accum": ("wga.py", ["--split", "forget01", "--grad-accum", "4"],
                                       "must divide the default batch of 10 rows (the whole forget set)"),
    "D_r beyond the held-out rows": ("npo.py", ["--geffect-every", "1", "--geffect-retain", "401"],
                                     "--geffect-retain in 1..400"),
}


SUBPROCESS = {"unknown --reg", "unreachable hub id", "model folder without weights"}


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, tmp_path, tiny_path):
    script, flags, msg = CASES[case]
    flags = flags(tmp_path, tiny_path) if callable(flags) else flags
    before = sorted(p.name for p in tmp_path.iterdir())
    run = run_script if case in SUBPROCESS else run_main
    r = run(script, "--out", str(tmp_path / "x"), *flags)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and msg in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing new: no x, no x.tmp
    if (tmp_path / "x").exists():  # the existing model is left as it was
        assert [p.name for p in (tmp_path / "x").iterdir()] == ["config.json"]


def test_world_size_without_torchrun(tmp_path):
    """A stray WORLD_SIZE in the environment of a plain run: one line, not a hung process group."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "ga.py", "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(env, WORLD_SIZE="2", RANK="0"))
    assert r.returncode == 2 and r.stderr.strip() == ("ga.py: error: WORLD_SIZE is 2 but this is no torchrun launch "
                                                      "(MASTER_ADDR is unset): unset WORLD_SIZE or start the script "
                                                      "with torchrun"), r.stderr
    assert not os.listdir(tmp_path)
