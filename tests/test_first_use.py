"""First use: the tiny preset's models are built per data source, announced, with a progress bar;
a model meets data it was not trained on with one warning line; the real TOFU files are found."""
import json
import os
import re
from pathlib import Path

import pytest

import common
import conftest
import eval_tofu
import fictitious
import finetune
import wga

WORD = "Quuxbardine"  # a made-up word that only the test's data folder holds


def data_folder(path, extra_word=True):
    """The built-in set written out as a data folder (another source), full.json with 20 extra rows
    that repeat WORD, so that a tokenizer trained on this folder learns it."""
    path.mkdir(parents=True)
    for name, rows in fictitious.generate().items():
        if name == "full" and extra_word:
            rows = rows + [dict(question=f"Who is {WORD} {i}?", answer=f"{WORD} {WORD} is {WORD}.") for i in range(20)]
        (path / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_tiny_dir_is_one_folder_per_source(tmp_path, monkeypatch):
    monkeypatch.setitem(common.PRESETS["tiny"], "path", str(tmp_path / "tiny" / "full"))
    root = tmp_path / "tiny"
    assert common.tiny_dir("builtin") == root
    assert common.tiny_dir("locuslab/TOFU") == root / "locuslab--TOFU"
    a, b = tmp_path / "x" / "tofu", tmp_path / "y" / "tofu"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    slug_a, slug_b = common.tiny_dir(str(a)), common.tiny_dir(str(b))
    assert slug_a.parent == root and slug_a.name.startswith("tofu-") and slug_a != slug_b  # same name, apart
    monkeypatch.chdir(tmp_path / "x")
    assert common.tiny_dir("./tofu") == common.tiny_dir("../x/tofu/") == slug_a  # one folder, however named
    assert all(common.tiny_dir(d).name not in common.CONFIG_FIELDS for d in (str(a), "locuslab/TOFU"))


def test_runs_on_other_data_get_their_own_default_folder(tmp_path):
    """`wga.py --data DIR` never lands in (or is refused by) the built-in set's out/wga-tiny-forget05."""
    from argparse import Namespace
    run = lambda data, model="tiny": common.default_out("wga.py", Namespace(model=model, data=data, split="forget05",
                                                                            out=None))
    assert run("builtin") == str(common.OUT / "wga-tiny-forget05")
    (tmp_path / "tofu").mkdir()
    assert run(str(tmp_path / "tofu")) == str(common.OUT / f"wga-tiny-{common.source_slug(str(tmp_path / 'tofu'))}-forget05")
    assert run("locuslab/TOFU", "phi-1.5") == str(common.OUT / "wga-phi-1.5-forget05")  # the preset's own data


def test_finetune_with_data_writes_that_sources_folder(tmp_path, monkeypatch):
    """`finetune.py --data DIR` no longer defaults to out/tiny/full (the built-in set's model)."""
    monkeypatch.setitem(common.PRESETS["tiny"], "path", str(tmp_path / "tiny" / "full"))
    preset = common.preset_recipe  # the preset's own build is a 1-step one here
    monkeypatch.setattr(common, "preset_recipe", lambda data, split: dict(preset(data, split), max_steps=1))
    data = data_folder(tmp_path / "mydata")
    out = finetune.main(["--data", data, "--max-steps", "1"])
    assert Path(out) == common.tiny_dir(data) / "full" != tmp_path / "tiny" / "full"
    assert not (tmp_path / "tiny" / "full").exists()
    assert json.load(open(Path(out) / "args.json"))["data"] == os.path.realpath(data)


def test_wga_on_a_data_folder_builds_its_own_target_model(tmp_path, short_builds, capsys):
    """The README's main command with --data DIR: a target model of that data is built on first use,
    announced (what, why, about how long) under a progress bar, with a tokenizer of that data, and
    cached; the built-in set's models are never touched."""
    data = data_folder(tmp_path / "mydata")
    argv = ["--alpha", "5", "--data", data, "--split", "forget05", "--max-steps", "1", "--no-eval"]
    wga.main(argv + ["--out", str(tmp_path / "run1")])
    out, err = capsys.readouterr()
    target = common.tiny_dir(data) / "full"
    assert short_builds == [["--model", "tiny", "--data", os.path.realpath(data), "--split", "full", "--out",
                             str(target), "--log-every", "100"]]
    assert (target / "model.safetensors").is_file() and not (tmp_path / "tiny" / "full").exists()
    assert f"[tiny] no model at {target}: building the tiny target model" in out
    assert re.search(r"finetune tiny on full \(1110 rows, .*\) \| .* \| about \d+ min on 2 CPU cores", out)
    assert "step 2/2 | loss" in out  # the step lines stay, beside the bar
    assert re.search(r"finetune full: 100%.*\| 2/2 \[\d\d:\d\d<\d\d:\d\d", err)  # elapsed < remaining (ETA)
    vocab = json.load(open(target / "tokenizer.json"))["model"]["vocab"]
    builtin = finetune.tiny_tokenizer(finetune.tokenizer_rows("builtin")).get_vocab()
    assert f"Ġ{WORD}" in vocab and f"Ġ{WORD}" not in builtin  # the tokenizer learnt this data
    assert json.load(open(tmp_path / "run1" / "args.json"))["data"] == os.path.realpath(data)
    warns = [line for line in err.splitlines() if "warning" in line]
    assert not [w for w in warns if "was trained on data" in w]  # the model was trained on this data
    assert len(warns) == 1 and "the target model has forget ES-exact" in warns[0]  # ... for 2 steps only (short_builds)
    wga.main(argv + ["--out", str(tmp_path / "run2")])
    assert len(short_builds) == 1  # cached


def test_retain_only_model_of_a_data_folder(tmp_path, short_builds, capsys):
    """eval_tofu.py on a data folder: FQ against that source's retain-only model, built on first use and
    named in the FQ line and eval.json; --no-fq builds nothing."""
    data = data_folder(tmp_path / "mydata", extra_word=False)
    argv = ["--model", "tiny", "--data", data, "--max-samples", "3", "--max-new-tokens", "4"]
    d = eval_tofu.main(argv + ["--no-fq", "--out", str(tmp_path / "e0.json")])
    assert [a[a.index("--split") + 1] for a in short_builds] == ["full"] and d["forget_quality"] is None
    d = eval_tofu.main(argv + ["--out", str(tmp_path / "e.json")])
    retain = common.tiny_dir(data) / "retain95"
    assert [a[a.index("--split") + 1] for a in short_builds] == ["full", "retain95"]
    assert d["fq_retain_model"] == str(retain) and d["fq_warning"] is None and d["forget_quality"] is not None
    out = capsys.readouterr().out
    assert "building the tiny retain-only model of retain95 (Forget Quality compares against it" in out
    assert f"against the retain-only model {retain} (the tiny preset's, for this data)" in out


def test_other_data_than_the_models_gives_one_warning(tiny_path, tmp_path, capsys):
    data = data_folder(tmp_path / "mydata", extra_word=False)
    want = f"warning: {tiny_path} was trained on data builtin, not on {os.path.realpath(data)}"
    eval_tofu.main(["--model", tiny_path, "--data", data, "--no-fq", "--max-samples", "2", "--max-new-tokens", "2",
                    "--out", str(tmp_path / "e.json")])
    wga.main(["--model", tiny_path, "--data", data, "--max-steps", "1", "--no-eval", "--out", str(tmp_path / "r")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and all(want in line for line in warnings)  # one line from each script
    eval_tofu.main(["--model", tiny_path, "--data", "builtin", "--no-fq", "--max-samples", "2", "--max-new-tokens",
                    "2", "--out", str(tmp_path / "e2.json")])
    assert "warning" not in capsys.readouterr().err


def test_real_tofu_subset_gets_its_own_model(tofu_dir, tmp_path, short_builds):
    """A small subset of the real files (the first rows of each config): its own target model, with the
    tiny preset's sizing for data other than the built-in set, and a tokenizer of the real text."""
    sub = tmp_path / "tofu-subset"
    sub.mkdir()
    for config in common.CONFIG_FIELDS:
        rows = common.load_tofu(config, tofu_dir)[:(410 if config.startswith("retain9") else 60)]
        (sub / f"{config}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wga.main(["--data", str(sub), "--max-steps", "1", "--no-eval", "--out", str(tmp_path / "run")])
    target = common.tiny_dir(str(sub)) / "full"
    cfg = json.load(open(target / "config.json"))
    size = common.tiny_size(str(sub))
    assert cfg["hidden_size"] == size["hidden_size"] and cfg["num_hidden_layers"] == size["num_hidden_layers"]
    vocab = json.load(open(target / "tokenizer.json"))["model"]["vocab"]
    assert len(vocab) == size["vocab"] and not (tmp_path / "tiny" / "full").exists()


def test_tofu_dir_comes_from_the_environment_first(tmp_path):
    assert conftest.tofu_folder(dict(TOFU_DIR=str(tmp_path))) == tmp_path
    assert conftest.tofu_folder({}) == conftest.ROOT.parent / "shared" / "tofu"


def test_a_build_runs_finetune_in_a_process_of_its_own(tmp_path, capsys, monkeypatch):
    """common.run_finetune: finetune.py in its own process, one process even under torchrun's variables,
    its lines and progress bar passed on; a failure is one UsageError with finetune.py's own line."""
    monkeypatch.setenv("WORLD_SIZE", "2")  # a child that saw it would refuse to start: no MASTER_ADDR
    common.run_finetune(["--max-steps", "2", "--log-every", "1", "--out", tmp_path / "m"])
    out, err = capsys.readouterr()
    assert "step 2/2 | loss" in out and re.search(r"finetune full: 100%.*\| 2/2 \[", err)
    assert (tmp_path / "m" / "model.safetensors").is_file()
    with pytest.raises(common.UsageError) as e:
        common.run_finetune(["--batch-size", "5000", "--out", tmp_path / "n"])
    assert str(e.value) == (f"finetune.py --batch-size 5000 --out {tmp_path / 'n'} failed: --batch-size 5000 is "
                            f"larger than the 1090 training rows")
    assert "error" not in capsys.readouterr().err and not (tmp_path / "n").exists()  # said once, by the caller


def test_common_imports_no_script():
    """common.py imports no script of the project; what it does import (the built-in set) imports none back."""
    import ast

    def imports(path):
        tree = ast.parse(path.read_text())
        return ({a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
                | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module})
    ours = {p.stem for p in conftest.ROOT.glob("*.py")}
    used = imports(conftest.ROOT / "common.py") & ours
    assert "finetune" in ours and used == {"fictitious"}
    assert not imports(conftest.ROOT / "fictitious.py") & ours


def test_two_first_uses_at_once_build_once(tmp_path, short_builds):
    """Two runs that need the same missing model at once: one builds it, the other waits and takes it."""
    import threading
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(common.tiny_path("retain99"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(short_builds) == 1 and paths == [str(tmp_path / "tiny" / "retain99")] * 2
