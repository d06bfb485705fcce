"""A run writes only what is its own: --out is new, empty, or a run folder this project wrote (its mark,
common.MARKER); replacing one takes --overwrite and removes that run's own files only. The tiny preset's
folders hold its own build only: a shortened build or an unmarked folder is refused, in one line."""
import json
import os
import shutil
from pathlib import Path

import pytest

import common
import finetune
import wga
from conftest import run_main

RUN = ["--split", "forget01", "--max-steps", "1", "--no-eval"]


@pytest.fixture(scope="module")
def finished(tiny_path, tmp_path_factory):
    """One finished ga.py run folder, copied by the tests that need one (as a run would have left it)."""
    d = tmp_path_factory.mktemp("finished") / "run"
    r = run_main("ga.py", *RUN, "--out", str(d))
    assert r.returncode == 0, r.stderr
    return d


def copy_run(finished, to: Path) -> Path:
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(finished, to)
    return to


def listing(root: Path) -> dict:
    """Every file under root with its bytes: what 'nothing touched' compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(r, *words):
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_a_folder_with_a_users_file_is_refused_and_untouched(tiny_path, tmp_path):
    d = tmp_path / "experiments"
    (d / "mynotes").mkdir(parents=True)
    (d / "mynotes" / "keep.txt").write_text("mine")
    (d / "config.json").write_text("{}")  # looks like a model, but this project did not write it
    before = listing(tmp_path)
    for extra in ([], ["--overwrite"]):
        r = run_main("ga.py", *RUN, "--out", str(d), *extra)
        refused(r, str(d), "did not write", "nothing was touched")
        assert listing(tmp_path) == before and not (tmp_path / "experiments.tmp").exists()


def test_the_cache_parent_is_refused(finished, tmp_path):
    """The issue's case: `--out out` where out/ holds the tiny model's cache, an earlier run and a note."""
    out = tmp_path / "out"
    for run in ("tiny/full", "wga-tiny-forget05"):
        copy_run(finished, out / run)
    (out / "mynotes").mkdir()
    (out / "mynotes" / "keep.txt").write_text("mine")
    before = listing(tmp_path)
    refused(run_main("ga.py", *RUN, "--out", str(out), "--overwrite"), "did not write")
    assert listing(tmp_path) == before and not (tmp_path / "out.tmp").exists()


def test_the_current_folder_is_refused(tiny_path, tmp_path, monkeypatch, capsys):
    for name, files in (("work", ["notes.txt"]), ("empty", [])):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).write_text("mine")
        before = sorted(os.listdir(tmp_path))
        monkeypatch.chdir(d)
        with pytest.raises(SystemExit) as e:
            wga.main(RUN + ["--out", ".", "--overwrite"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "is the current folder" in err and len(err.strip().splitlines()) == 1, err
        assert sorted(os.listdir(d)) == files and sorted(os.listdir(tmp_path)) == before


def test_an_empty_folder_takes_the_run(tiny_path, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    assert run_main("ga.py", *RUN, "--out", str(d)).returncode == 0
    mark = json.loads((d / common.MARKER).read_text())
    assert mark["written_by"] == common.PROJECT and mark["script"] == "ga.py" and mark["complete"] is True
    assert set(mark["files"]) == set(os.listdir(d)) and {"model.safetensors", "args.json"} <= set(mark["files"])


def test_a_finished_run_is_replaced_with_overwrite_only_and_keeps_the_users_files(finished, tmp_path):
    d = copy_run(finished, tmp_path / "run")
    (d / "notes.txt").write_text("mine")  # the user's, inside the run folder
    (d / "plots").mkdir()
    (d / "plots" / "a.png").write_bytes(b"png")
    (d / "eval.json").write_text("{}")
    common.register(d / "eval.json")  # what eval_tofu.write_json does: the old model's evaluation is the run's own
    before = listing(tmp_path)
    r = run_main("ga.py", *RUN, "--lr", "0.05", "--out", str(d))
    refused(r, "holds a ga.py run already", "--overwrite")
    assert listing(tmp_path) == before
    r = run_main("ga.py", *RUN, "--lr", "0.05", "--out", str(d), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (d / "model.safetensors").read_bytes() != before["run/model.safetensors"]
    assert json.load(open(d / "args.json"))["lr"] == 0.05
    assert (d / "notes.txt").read_text() == "mine" and (d / "plots" / "a.png").read_bytes() == b"png"
    assert not (d / "eval.json").exists()  # it described the replaced model
    assert "notes.txt" not in json.loads((d / common.MARKER).read_text())["files"]  # still the user's
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no .tmp, no replaced folder left behind


def test_a_users_file_named_like_the_runs_is_kept_aside(finished, tmp_path):
    d = copy_run(finished, tmp_path / "run")
    for f in ("config.json", "model.safetensors"):  # as a --no-save run leaves it
        (d / f).unlink()
    common.write_marker(d, dict(common.read_marker(d), files=sorted(os.listdir(d))))
    (d / "config.json").write_text('{"mine": 1}')  # the user's, and the next run writes a config.json too
    r = run_main("ga.py", *RUN, "--out", str(d), "--overwrite")
    assert r.returncode == 0 and "warning: config.json in" in r.stderr, r.stderr
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(kept) == 1 and (kept[0] / "config.json").read_text() == '{"mine": 1}'
    assert json.load(open(d / "config.json"))["model_type"] == "llama"


def test_a_run_stopped_half_way_leaves_the_old_run_and_is_redone(finished, tmp_path):
    d = copy_run(finished, tmp_path / "run")
    before = listing(d)

    class Args:
        overwrite = True
    stopped = common.Run(str(d), Args())  # started, then stopped before its save: a half-written twin
    stopped.log(dict(step=1))
    assert listing(d) == before and common.read_marker(tmp_path / "run.tmp")["complete"] is False
    r = run_main("ga.py", *RUN, "--lr", "0.05", "--out", str(d), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["run"] and listing(d)["model.safetensors"] != before["model.safetensors"]


def test_a_twin_still_being_written_is_left_alone(finished, tmp_path):
    """Two runs on one --out at once: the second never removes the twin the first is writing."""
    import socket
    import subprocess
    import sys
    d = tmp_path / "run"
    twin = tmp_path / "run.tmp"
    twin.mkdir()
    (twin / "log.jsonl").write_text("{}\n")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        common.write_marker(twin, dict(script="npo.py", complete=False, pid=alive.pid, host=socket.gethostname()))
        refused(run_main("ga.py", *RUN, "--out", str(d)), "is being written by a run still going", str(alive.pid))
        assert sorted(listing(tmp_path)) == sorted([f"run.tmp/{common.MARKER}", "run.tmp/log.jsonl"])
    finally:
        alive.kill()
        alive.wait()
    assert run_main("ga.py", *RUN, "--out", str(d)).returncode == 0  # its process is gone: a stopped run's twin
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_runs_never_write_into_the_presets_models(tiny_path, tmp_path, monkeypatch):
    monkeypatch.setitem(common.PRESETS["tiny"], "path", str(tmp_path / "tiny" / "full"))
    refused(run_main("ga.py", *RUN, "--out", str(tmp_path / "tiny" / "mine"), "--overwrite"),
            "where the tiny preset keeps its models")
    assert not (tmp_path / "tiny").exists()


def test_the_recorded_recipe_is_the_presets_flags(tiny_path):
    """The session's tiny model records the build's recipe, written out here by hand from finetune.py's
    defaults and common.PRESETS['tiny'] (30 epochs at 3e-3, batch 32, the built-in sizes)."""
    assert common.read_marker(tiny_path)["recipe"] == dict(
        data="builtin", split="full", template="Question: {q}\nAnswer: {a}", lr=0.003, epochs=30, batch_size=32,
        grad_accum=1, warmup_epochs=1, max_grad_norm=1.0, optim="adamw", max_steps=0, seed=0, version=2,
        size=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256, vocab=2048))
    assert common.preset_recipe("builtin", "full") == common.tiny_recipe(finetune.parse([]))  # finetune.py's defaults


def test_a_tmp_twin_that_is_not_ours_is_refused(tiny_path, tmp_path):
    (tmp_path / "run.tmp").mkdir()
    (tmp_path / "run.tmp" / "keep.txt").write_text("mine")
    refused(run_main("ga.py", *RUN, "--out", str(tmp_path / "run")), "run.tmp", "move it away")
    assert listing(tmp_path) == {"run.tmp/keep.txt": b"mine"}


def test_a_symbolic_link_is_refused(tiny_path, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    refused(run_main("ga.py", *RUN, "--out", str(tmp_path / "link")), "symbolic link")
    assert os.listdir(tmp_path / "real") == []


def test_uwc_eval_and_sweep_refuse_a_users_folder(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    before = listing(tmp_path)
    refused(run_main("uwc.py", "--model", str(run), "--split", "forget01", "--out", str(mine)), "did not write")
    refused(run_main("sweep.py", "--method", "ga", "--split", "forget01", "--out", str(mine)), "not a sweep's folder")
    refused(run_main("eval_tofu.py", "--model", str(run), "--split", "forget01", "--no-fq", "--out",
                     str(mine / "keep.txt")), "was not written by this project")
    assert listing(tmp_path) == before


def test_eval_json_is_the_runs_own_and_a_users_is_never_replaced(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    argv = ["--model", str(run), "--split", "forget01", "--no-fq", "--max-samples", "2", "--max-new-tokens", "2"]
    for _ in range(2):  # evaluated again: its own eval.json is replaced
        assert run_main("eval_tofu.py", *argv).returncode == 0
    assert "eval.json" in common.read_marker(run)["files"] and common.own_file(run / "eval.json")
    theirs = tmp_path / "theirs"  # a model folder of the user's, with an eval.json of their own
    theirs.mkdir()
    for f in os.listdir(run):
        if f not in (common.MARKER, "eval.json"):
            (theirs / f).write_bytes((run / f).read_bytes())
    (theirs / "eval.json").write_text('{"mine": 1}')
    refused(run_main("eval_tofu.py", *argv[:1], str(theirs), *argv[2:]), "eval.json exists", "give another --out")
    assert (theirs / "eval.json").read_text() == '{"mine": 1}'


# ----------------------------------------------------------------------------- the tiny preset's own build

@pytest.fixture
def preset_root(tmp_path, monkeypatch):
    """The tiny preset's models under tmp_path/tiny, and the project's out/ at tmp_path/out."""
    monkeypatch.setitem(common.PRESETS["tiny"], "path", str(tmp_path / "tiny" / "full"))
    monkeypatch.setattr(common, "OUT", tmp_path / "out")
    return tmp_path / "tiny"


def test_a_shortened_build_never_becomes_the_presets_model(preset_root, tmp_path, capsys):
    """The issue's case: `finetune.py --max-steps 2` writes its own folder, not out/tiny/full."""
    out = finetune.main(["--max-steps", "2", "--log-every", "100"])
    assert Path(out) == tmp_path / "out" / "finetune-tiny-full" and not preset_root.exists()
    assert "not the tiny preset's build (--max-steps 2)" in capsys.readouterr().out
    assert common.read_marker(out)["recipe"]["max_steps"] == 2
    with pytest.raises(SystemExit) as e:  # nor can it be put there by hand
        finetune.main(["--max-steps", "2", "--out", str(preset_root / "full")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "where the tiny preset keeps its models" in err and "--max-steps 2" in err, err
    with pytest.raises(SystemExit):  # nor another config's build into full's folder
        finetune.main(["--split", "retain99", "--out", str(preset_root / "full")])
    assert "this build's folder is" in capsys.readouterr().err and not preset_root.exists()


@pytest.mark.parametrize("case,why,fix", [
    ("short", "it was built with --max-steps 2", "rebuild it: python finetune.py --split full --overwrite"),
    ("lr", "it was built with --lr 0.01", "--overwrite"),
    ("older", "it was built with an older recipe", "--overwrite"),
    ("unfinished", "its build did not finish", "--overwrite"),
    ("unmarked", "it carries no mark of this project's", "move it away, then rebuild it: python finetune.py --split full"),
])
def test_a_preset_folder_that_is_not_the_presets_build_is_refused(preset_root, tmp_path, case, why, fix):
    full = preset_root / "full"
    full.mkdir(parents=True)
    (full / "model.safetensors").write_bytes(b"weights")
    recipe = common.preset_recipe("builtin", "full")
    recipe = dict(recipe, **{"short": dict(max_steps=2), "lr": dict(lr=0.01), "older": dict(version=0)}.get(case, {}))
    if case != "unmarked":
        common.write_marker(full, dict(script="finetune.py", complete=case != "unfinished", recipe=recipe))
    with pytest.raises(common.UsageError) as e:
        common.model_path("tiny")
    assert str(full) in str(e.value) and why in str(e.value) and fix in str(e.value), str(e.value)
    r = run_main("wga.py", "--max-steps", "1", "--no-eval", "--out", str(tmp_path / "run"))
    refused(r, str(full), why)
    assert not (tmp_path / "run").exists()


def test_the_presets_own_build_is_taken(preset_root):
    full = preset_root / "full"
    full.mkdir(parents=True)
    common.write_marker(full, dict(script="finetune.py", complete=True, recipe=common.preset_recipe("builtin", "full")))
    assert common.model_path("tiny") == str(full)
    other = dict(common.preset_recipe("builtin", "full"), split="retain95")  # the recipe names its config
    common.write_marker(full, dict(script="finetune.py", complete=True, recipe=other))
    with pytest.raises(common.UsageError, match="built with --split retain95"):
        common.model_path("tiny")


def test_write_json_never_replaces_a_users_file_in_a_run_folder(finished, tmp_path):
    import eval_tofu
    d = copy_run(finished, tmp_path / "run")
    (d / "uwc.json").write_text("mine")  # the user's: not in the run's list
    with pytest.raises(common.UsageError, match="not the run's own"):
        eval_tofu.write_json(str(d / "uwc.json"), dict(lam=1.0))
    assert (d / "uwc.json").read_text() == "mine"
    eval_tofu.write_json(str(d / "row.json"), dict(lam=0.5))  # a new file becomes the run's own, and is replaced
    eval_tofu.write_json(str(d / "row.json"), dict(lam=0.25))
    assert json.load(open(d / "row.json")) == dict(lam=0.25) and "row.json" in common.read_marker(d)["files"]
