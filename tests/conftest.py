import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Several pytest-xdist workers share the cores: one thread each (and in the processes they start), set
# before torch is imported. The numbers do not depend on it (common.reproducible_cpu).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
import common  # noqa: E402,F401  first: it sets the reproducible CPU arithmetic before torch computes anything


def tofu_folder(environ=os.environ) -> Path:
    """The real TOFU files, by path: $TOFU_DIR, else ../shared/tofu beside the project (absent on most machines)."""
    return Path(environ.get("TOFU_DIR") or ROOT.parent / "shared" / "tofu")


TOFU = tofu_folder()


def pytest_configure(config):
    """The tiny target model, fine-tuned once before any test runs if it is not cached (about 2.5 minutes
    on 2 cores, with every core: no worker has started yet), for every worker to share."""
    if not hasattr(config, "workerinput"):  # the main process, not an xdist worker
        common.model_path("tiny")


# The longest files first: with one file to a worker (pytest.ini), a long file reached last would
# keep one worker busy while the others wait.
LONGEST = ("test_sweep.py", "test_sweep_scale.py", "test_objectives.py", "test_distributed.py", "test_lora.py", "test_nothing_to_unlearn.py",
           "test_eval.py", "test_figures.py", "test_architectures.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tofu_dir():
    if not any((TOFU / f"full{ext}").is_file() for ext in (".json", ".jsonl")):
        pytest.skip(f"the real TOFU files are not at {TOFU} (set TOFU_DIR to their folder)")
    return str(TOFU)


@pytest.fixture(scope="session")
def tiny_path():
    """The tiny target model (pytest_configure built it if it was missing)."""
    return common.model_path("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    import fictitious
    import finetune
    return finetune.tiny_tokenizer([r for rs in fictitious.generate().values() for r in rs])


@pytest.fixture
def short_builds(tmp_path, monkeypatch):
    """The tiny preset's models under tmp_path/tiny, each build finetune.py's own fine-tune cut to 2 steps
    and run in this process (common.run_finetune replaced); returns the list of builds' argv."""
    import common
    import finetune
    calls = []

    def short(argv):
        calls.append(list(argv))
        finetune.main(list(argv) + ["--max-steps", "2"])

    monkeypatch.setitem(common.PRESETS["tiny"], "path", str(tmp_path / "tiny" / "full"))
    monkeypatch.setattr(common, "run_finetune", short)
    preset = common.preset_recipe  # the preset's own build is the short one here
    monkeypatch.setattr(common, "preset_recipe", lambda data, split: dict(preset(data, split), max_steps=2))
    return calls


def run_main(script, *args, merged=False):
    """Run a project script's main() in this process, as `python script args` from the project root
    would: returns a CompletedProcess (returncode, stdout, stderr) like run_script, without the 3 s
    of starting Python and importing torch. For bad input and short runs; what a separate process
    shows (signals, torchrun, the hub's log lines, tracebacks) needs run_script. `merged`: stderr
    goes into stdout, in the order the lines were written (stderr is then empty)."""
    import contextlib
    import importlib
    import io
    import subprocess
    module = importlib.import_module(script.removesuffix(".py"))
    out, code = io.StringIO(), 0
    err = out if merged else io.StringIO()
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = [script, *map(str, args)]  # the error line names sys.argv[0]
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), "" if merged else err.getvalue())


def run_script(*args, timeout=600, env=None):
    """Run a project script in a subprocess from the project root (`env`: its environment, default
    this one's); returns CompletedProcess."""
    import subprocess
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)
