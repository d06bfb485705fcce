"""attack.py: T and V, recovery by hand, relearning that goes on from one S to the next, the control, the
quantized layers against what 8- and 4-bit quantization means, attack.json, a LoRA run and a plain folder,
bad input."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import attack
import common
import eval_tofu
from conftest import run_main

QA = common.QA_TEMPLATE


# ----------------------------------------------------------------------------- T and V, recovery

@pytest.mark.parametrize("n_rows,author_rows", [(50, 10), (200, 20), (40, 20)])  # built-in forget05, TOFU forget05, 01
def test_other_authors_halves(n_rows, author_rows):
    n_authors, splits = n_rows // author_rows, set()
    for seed in range(6):
        T, V = attack.author_split(n_rows, author_rows, seed)
        assert (T, V) == attack.author_split(n_rows, author_rows, seed)  # the same for a seed
        assert not set(T) & set(V) and sorted(T + V) == list(range(n_rows))
        authors = lambda rows: {i // author_rows for i in rows}
        assert len(authors(T)) == n_authors // 2 and len(authors(V)) == n_authors - n_authors // 2
        assert not authors(T) & authors(V) and len(T) == author_rows * (n_authors // 2)  # whole authors only
        splits.add(tuple(T))
    assert len(splits) > 1 or n_authors == 2  # the seed chooses (two authors: only two ways)


def test_same_authors_halves():
    splits = set()
    for seed in range(4):
        T, V = attack.author_split(50, 10, seed, "same-authors")
        assert (T, V) == attack.author_split(50, 10, seed, "same-authors")
        assert not set(T) & set(V) and sorted(T + V) == list(range(50))
        for a in range(5):  # half of every author's questions to T, the other half to V
            assert sum(a * 10 <= i < a * 10 + 10 for i in T) == 5 == sum(a * 10 <= i < a * 10 + 10 for i in V)
        splits.add(tuple(T))
    assert len(splits) == 4
    T, V = attack.author_split(21, 7, 0, "same-authors")  # odd: 3 of 7 to T
    assert [sum(a * 7 <= i < a * 7 + 7 for i in T) for a in range(3)] == [3, 3, 3]


def test_recovery_by_hand():
    assert attack.recovery(0.5, 0.2, 0.8) == pytest.approx(0.3 / 0.6)
    assert attack.recovery(0.2, 0.2, 0.8) == 0 and attack.recovery(0.8, 0.2, 0.8) == 1
    assert attack.recovery(0.1, 0.2, 0.8) == pytest.approx(-0.1 / 0.6)  # below the unlearned model: negative
    assert attack.recovery(0.5, 0.7, 0.7) is None and attack.recovery(None, 0.2, 0.8) is None


# ----------------------------------------------------------------------------- relearning, the control

@pytest.fixture(scope="module")
def unlearned(tmp_path_factory):
    """A 2-step GA run on forget01 (10 rows, one author): an 'unlearned' model."""
    out = tmp_path_factory.mktemp("attack") / "ga"
    r = run_main("ga.py", "--split", "forget01", "--max-steps", "2", "--lr", "0.003", "--no-eval", "--out", out)
    assert r.returncode == 0, r.stderr
    return str(out)


def test_relearning_goes_on_from_one_S_to_the_next(tiny_path):
    """S = 2 measured after S = 1 is the fresh 2-step run, to the bit; S = 1 is not it."""
    tok = common.load_tokenizer(tiny_path)
    rows = common.load_tofu("forget05")[:7]
    probe = common.load_tofu("retain95")[:4]
    measure = lambda m: dict(es=eval_tofu.es_exact(m, tok, probe, QA), head=m.lm_head.weight.double().sum().item())
    runs = {}
    for steps in ([1, 2], [2]):
        model = common.load_model(tiny_path, frozen=True)
        res = attack.relearn(model, tok, rows, steps, 3e-3, 3, 0, QA, measure)  # batches of 3: 3 per epoch
        runs[tuple(steps)] = (res, {k: v.clone() for k, v in model.state_dict().items()})
    (both, w12), (fresh, w2) = runs[(1, 2)], runs[(2,)]
    assert [r["steps"] for r in both] == [1, 2] and all(torch.equal(w12[k], w2[k]) for k in w2)
    assert both[1] == fresh[0] and both[0]["head"] != both[1]["head"]  # S = 1 is another model
    original = common.load_model(tiny_path, frozen=True).state_dict()
    assert any(not torch.equal(w2[k], original[k]) for k in original)


@pytest.fixture(scope="module")
def attacked(unlearned, tiny_path, tmp_path_factory):
    """attack.py with its defaults; the tiny preset's retain-only model is a stand-in here (a copy of the
    target model: the real retain99 takes minutes to fine-tune on first use)."""
    pytest.importorskip("bitsandbytes")  # in requirements.txt: only a partial install lacks it
    root = tmp_path_factory.mktemp("attacked")
    stand_in = str(shutil.copytree(tiny_path, root / "retain99"))
    out = root / "attack.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval_tofu, "tiny_retain_model", lambda split, data="builtin": stand_in)
        r = run_main("attack.py", "--model", unlearned, "--relearn-on", "same-authors", "--relearn-steps", "1,2",
                     "--quant-bits", "8,4", "--max-samples", "16", "--out", out)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text()), r.stdout, out, stand_in


def test_attack_json(attacked):
    d, stdout, out, _ = attacked
    assert d["split"] == "forget01" and d["original"] == str(common.tiny_dir() / "full")  # from the run's args.json
    keys = {"es_exact_v", "es_perturb_v", "es_exact_retain", "auc_min_k_pp_v", "es_exact_unlearn", "es_perturb_unlearn"}
    assert set(d["before"]["unlearned"]) == keys == set(d["before"]["original"]) == set(d["before"]["retain_only"])
    relearnt = [a for a in d["attacks"] if a["attack"] == "relearn"]
    quantized = [a for a in d["attacks"] if a["attack"] == "quantize"]
    assert [a["steps"] for a in relearnt] == [1, 2] and [a["bits"] for a in quantized] == [8, 4]
    for a in relearnt:
        assert {"on", "steps", "es_exact_v", "es_perturb_v", "es_exact_retain", "auc_min_k_pp_v", "control_es_exact_v",
                "recovery"} <= set(a) and a["on"] == "same-authors"
        b = d["before"]  # recovery = (ES_V after - ES_V unlearned) / (ES_V original - ES_V unlearned)
        want = (a["es_exact_v"] - b["unlearned"]["es_exact_v"]) / (b["original"]["es_exact_v"] - b["unlearned"]["es_exact_v"])
        assert a["recovery"] == pytest.approx(want, abs=1e-12)
    for a in quantized:
        assert {"bits", "es_exact_unlearn", "es_perturb_unlearn", "es_exact_retain", "control_es_exact_unlearn"} <= set(a)
        assert a["control_es_exact_unlearn"] > 0.9  # the original model, quantized, still knows the forget rows
    T, V = d["relearn"]["t"], d["relearn"]["v"]
    assert (T, V) == attack.author_split(10, 10, 0, "same-authors") and d["rows"] == dict(forget=10, retain=16,
                                                                                           holdout=10)
    assert "| relearnt | 2 |" in stdout and "| 4 |" in stdout and all(0 <= a["same_codes"] <= 1 for a in quantized)
    assert out.with_name("attack-relearn.png").stat().st_size > 0


def test_the_control_is_the_retain_only_model(attacked):
    """The control's numbers are the retain-only model's (for forget01 the tiny preset's retain99, a stand-in
    here), relearnt on T alike."""
    d, _, _, retain = attacked
    assert d["retain_model"] == retain
    tok, model = attack.load(retain)
    forget = common.load_tofu("forget01_perturbed")
    sets = dict(v=[forget[i] for i in d["relearn"]["v"]], holdout=common.load_tofu("holdout01")[:16],
                retain=common.split_data("forget01")["retain_eval"][:16])
    measure = lambda m: attack.measure_v(m, tok, sets, QA)
    assert measure(model)["es_exact_v"] == d["before"]["retain_only"]["es_exact_v"]
    res = attack.relearn(model, tok, [common.load_tofu("forget01")[i] for i in d["relearn"]["t"]], [1, 2],
                         d["relearn"]["lr"], d["relearn"]["batch_size"], 0, QA, measure)
    relearnt = [a for a in d["attacks"] if a["attack"] == "relearn"]
    assert [r["es_exact_v"] for r in res] == [a["control_es_exact_v"] for a in relearnt]
    assert [r["es_exact_retain"] for r in res] == [a["control_es_exact_retain"] for a in relearnt]


# ----------------------------------------------------------------------------- quantization

FP4 = [0.0, 0.0052, 1 / 6, 0.25, 1 / 3, 0.5, 2 / 3, 1.0]  # bitsandbytes' FP4 levels, over a block's absmax


def test_quantized_linear_layers(tiny_path):
    """Every linear layer but the output layer is quantized: 8 bits, int8 weights at a scale of absmax / 127 per
    output row; 4 bits, each block of 64 weights at the FP4 level nearest to it, over the block's absmax. The
    embeddings and the output layer keep their float weights, and the model still knows its forget rows."""
    bnb = pytest.importorskip("bitsandbytes")
    model = common.load_model(tiny_path, frozen=True)
    tok = common.load_tokenizer(tiny_path)
    q8, q4 = attack.quantize(model, 8), attack.quantize(model, 4)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(linear) == 7 * model.config.num_hidden_layers
    levels = torch.tensor(FP4 + [-x for x in FP4])
    for name in linear:
        W = model.get_submodule(name).weight
        l8, l4 = q8.get_submodule(name), q4.get_submodule(name)
        assert isinstance(l8, bnb.nn.Linear8bitLt) and l8.weight.dtype == torch.int8
        amax, i8 = W.abs().amax(1), l8.weight.data.float()
        assert ((l8.weight.SCB - amax).abs() <= 1e-3 * amax).all() and (i8.abs().amax(1) == 127).all()
        assert (i8 - W * 127 / l8.weight.SCB[:, None]).abs().max() <= 0.6  # rounded (the scale in float16)
        assert isinstance(l4, bnb.nn.Linear4bit) and l4.weight.dtype == torch.uint8
        qs = l4.weight.quant_state
        x = W.reshape(-1, 64) / W.reshape(-1, 64).abs().amax(1, keepdim=True)
        got = bnb.functional.dequantize_4bit(l4.weight.data, qs).reshape(-1, 64) / qs.absmax[:, None]
        nearest = (x[..., None] - levels).abs().min(-1).values
        assert ((x - got).abs() <= nearest + 1e-3).all() and (got[..., None] - levels).abs().min(-1).values.max() < 1e-3
    # quantized from the weights in memory: the bytes of the authors' route, the folder loaded with the config
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    disk = AutoModelForCausalLM.from_pretrained(tiny_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True),
                                                dtype=torch.float32, device_map="cpu").state_dict()
    mine = q4.state_dict()
    assert disk.keys() == mine.keys() and all(torch.equal(disk[k], mine[k]) for k in disk if torch.is_tensor(disk[k]))
    # same_codes: 1 against itself; one layer's weights negated change exactly its nonzero int8 codes
    assert attack.same_codes(q8, q8) == 1 == attack.same_codes(q4, q4)
    flipped = common.load_model(tiny_path, frozen=True)
    flipped.get_submodule(linear[3]).weight.neg_()
    nonzero = (q8.get_submodule(linear[3]).weight.data != 0).sum().item()
    total = sum(q8.get_submodule(n).weight.numel() for n in linear)
    assert attack.same_codes(attack.quantize(flipped, 8), q8) == pytest.approx(1 - nonzero / total, abs=1e-12)
    for q in (q8, q4):
        assert type(q.lm_head) is torch.nn.Linear and torch.equal(q.lm_head.weight, model.lm_head.weight)
        assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)
        with attack.quiet_int8():
            es = eval_tofu.es_exact(q, tok, common.load_tofu("forget05")[:8], QA)
        assert sum(es) / 8 > 0.9  # it runs, and the target model still knows its forget rows


# ----------------------------------------------------------------------------- any model folder, a LoRA run

def test_a_lora_run_and_a_plain_folder(tmp_path, tiny_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    stand_in = str(shutil.copytree(tiny_path, tmp_path / "retain99"))  # for the real one's minutes of fine-tuning
    monkeypatch.setattr(eval_tofu, "tiny_retain_model", lambda split, data="builtin": stand_in)
    lora = tmp_path / "lora"
    r = run_main("ga.py", "--split", "forget01", "--lora-r", "4", "--max-steps", "1", "--no-eval", "--out", lora)
    assert r.returncode == 0, r.stderr
    assert (lora / "adapter").is_dir()
    r = run_main("attack.py", "--model", lora, "--relearn-on", "same-authors", "--relearn-steps", "1",
                 "--quant-bits", "4", "--max-samples", "4")
    assert r.returncode == 0, r.stderr
    d = json.loads((lora / "attack.json").read_text())
    assert d["original"] == str(common.tiny_dir() / "full") and [a["attack"] for a in d["attacks"]] == ["relearn",
                                                                                                     "quantize"]
    assert "attack.json" in common.read_marker(lora)["files"]  # the run's own: replaced with the run
    plain = tmp_path / "plain"  # the same weights in a folder of one's own, without args.json
    plain.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(lora / f, plain / f)
    r = run_main("attack.py", "--model", plain, "--data", "builtin", "--split", "forget01", "--quant-bits", "8")
    assert r.returncode == 2 and "has no args.json naming its original model: give --original" in r.stderr
    r = run_main("attack.py", "--model", plain, "--data", "builtin", "--split", "forget01", "--original", "tiny",
                 "--relearn-steps", "none", "--quant-bits", "8", "--max-samples", "4")
    assert r.returncode == 0, r.stderr
    d = json.loads((plain / "attack.json").read_text())
    assert d["relearn"] is None and [a["bits"] for a in d["attacks"]] == [8] and not (plain / "attack-relearn.png").exists()


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags,says", [
    (["--relearn-steps", "5,x"], "--relearn-steps must be positive whole numbers in increasing order"),
    (["--relearn-steps", "10,5"], "--relearn-steps must be positive whole numbers in increasing order"),
    (["--relearn-steps", "0"], "--relearn-steps must be positive whole numbers in increasing order"),
    (["--quant-bits", "3"], "--quant-bits must be 8 and/or 4, comma-separated"),
    (["--quant-bits", "8,8"], "--quant-bits must be 8 and/or 4, comma-separated"),
    (["--relearn-steps", "none", "--quant-bits", "none"], "leave no attack to run"),
    (["--relearn-on", "other-authors"], "forget01 has 1 author: --relearn-on other-authors needs two or more"),
    (["--relearn-on", "same-authors", "--relearn-batch", "6"], "--relearn-batch 6 is larger than T's 5 rows"),
    (["--relearn-lr", "0"], "--relearn-lr must be positive"),
    (["--author-rows", "3"], "forget01 has 10 rows, not a whole number of authors of --author-rows 3"),
    (["--original", "./no/such/model"], "model folder './no/such/model' does not exist"),
])
def test_bad_input_one_line_exit_2_nothing_written(unlearned, tmp_path, flags, says):
    out = tmp_path / "a" / "attack.json"
    r = run_main("attack.py", "--model", unlearned, *flags, "--out", out)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "a").exists() and not (Path(unlearned) / "attack.json").exists()


def test_missing_model_and_missing_bitsandbytes(unlearned, tmp_path, monkeypatch):
    r = run_main("attack.py", "--model", tmp_path / "nope", "--out", tmp_path / "a.json")
    assert r.returncode == 2 and r.stderr.strip().endswith(f"model folder '{tmp_path / 'nope'}' does not exist")
    r = run_main("attack.py", "--out", tmp_path / "a.json")
    assert r.returncode == 2 and "--model is required" in r.stderr
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    r = run_main("attack.py", "--model", unlearned, "--out", tmp_path / "a.json")
    assert r.returncode == 2 and r.stderr.strip() == ("attack.py: error: --quant-bits needs bitsandbytes: pip install "
                                                      "bitsandbytes (or --quant-bits none)")
    assert list(tmp_path.iterdir()) == []
