"""The G-effect's groups and every method script on five architectures (tiny random weights): Llama,
Phi (phi-1.5's), GPT-2 (transformer.h, wte + wpe, tied), GPT-NeoX and Qwen2 (tied)."""
import importlib
import json

import pytest
import torch
import transformers
from torch import nn

import common
import geffect
import test_geffect
from test_geffect import measured_step, sgd_change

ARCHS = ["llama", "phi", "gpt2", "neox", "qwen2"]
METHODS = ["ga", "wga", "npo", "tnpo", "wtnpo", "po", "rmu", "simnpo", "satimp", "idkdpo", "undial"]
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def build(arch, tokenizer, seed=0, **overrides):
    """A 3-layer model of `arch` (one decoder layer per third) with the tiny tokenizer's vocabulary."""
    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    size = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                max_position_embeddings=256)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=16, n_layer=3, n_head=2, n_positions=256, **{**NO_DROPOUT, **overrides}, **ids)
    else:
        cls, extra = dict(llama=("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
                          phi=("PhiConfig", {}), neox=("GPTNeoXConfig", {}),
                          qwen2=("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)))[arch]
        cfg = getattr(transformers, cls)(**size, **extra, **ids, **overrides)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is faster, and on a busy machine about 10x faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tiny_tokenizer, tmp_path_factory):
    """Each architecture saved with the tokenizer, loadable with --model FOLDER."""
    root = tmp_path_factory.mktemp("archs")
    return {a: save(build(a, tiny_tokenizer), tiny_tokenizer, root / a) for a in ARCHS}


def run(method, folder, out, *extra):
    argv = ["--model", folder, "--data", "builtin", "--max-steps", "2", "--no-eval", "--batch-size", "4",
            "--geffect-every", "1", "--geffect-retain", "4", "--out", str(out), *extra]
    importlib.import_module(method).main(argv + (["--layer", "2"] if method == "rmu" else []))
    return ([json.loads(line) for line in open(out / "geffect.jsonl")],
            [json.loads(line) for line in open(out / "log.jsonl")])


@pytest.mark.parametrize("arch", ARCHS)
def test_param_groups(arch, tiny_tokenizer):
    model = build(arch, tiny_tokenizer)
    groups = geffect.param_groups(model)
    ids = [id(p) for _, p, _, _ in groups]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    layers = common.decoder_layers(model)
    assert len(layers) == 3
    for i, layer in enumerate(layers):
        mine = {id(p) for p in layer.parameters()}
        assert {id(p) for _, p, g, l in groups if l == i} == mine
        assert {g for _, p, g, _ in groups if id(p) in mine} == {geffect.GROUPS[1 + i]}  # 3 layers: one a third
    embed = {id(p) for _, p, g, _ in groups if g == "embed"}
    assert id(model.get_input_embeddings().weight) in embed
    if arch == "gpt2":
        assert embed == {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    else:
        assert embed == {id(model.get_input_embeddings().weight)}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (arch in ("gpt2", "qwen2"))
    lm = {id(p) for _, p, g, _ in groups if g == "lm"}
    assert (id(model.get_output_embeddings().weight) in lm) == (not tied)  # a tied matrix counts in 'embed'
    assert lm  # the final norm at least
    assert all(any(g == name for _, _, g, _ in groups) for name in geffect.GROUPS)


@pytest.mark.parametrize("arch", ARCHS)
def test_geffect_matches_an_sgd_step(arch, tiny_tokenizer, tmp_path, monkeypatch):
    """test_geffect's finite-difference check (float64, no dropout) on each architecture, per group."""
    monkeypatch.setattr(test_geffect, "small_model", lambda tok, seed=0: build(arch, tok, seed).double())
    model, row, forget_batches, d_r, _ = measured_step(tmp_path, tiny_tokenizer, "ga", "kl")
    for key, batches in (("unlearn", forget_batches), ("retain", d_r)):
        for groups in (geffect.GROUPS, *[(g,) for g in geffect.GROUPS]):
            want = row[key]["total"] if len(groups) > 1 else row[key][groups[0]]
            assert want != 0, (key, groups)
            eps = 1e-3 / max(abs(want), 1e-3)
            got = sgd_change(model, batches, groups, eps)
            assert got == pytest.approx(want, rel=0.02, abs=1e-6), (key, groups, got, want)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_two_steps_with_the_geffect(arch, method, folders, tmp_path):
    rows, log = run(method, folders[arch], tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and [x["step"] for x in log] == [1, 2]
    for key in ("unlearn", "retain"):
        # RMU's objective stops at --layer 2: the deep layer and lm get a gradient only from KL, which is
        # 0 at theta_o (step 1) and not at step 2
        assert all(any(r[key][g] != 0 for r in rows) for g in geffect.GROUPS), (key, rows)
        assert all(r[key]["total"] != 0 for r in rows) and len(rows[0][key]["layers"]) == 3


def test_dropout_is_kept_and_the_probe_measures_in_training_mode(tiny_tokenizer, tmp_path, monkeypatch):
    """GPT-2's default dropout (0.1) stays on in training, as in TOFU's code: KL to the original is not
    0 at theta_o; D_r's forward runs in training mode like the step's; and the probe leaves the
    random state as it found it, so probed and unprobed runs draw the same dropout masks."""
    dropout = save(build("gpt2", tiny_tokenizer, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
                   tiny_tokenizer, tmp_path / "gpt2-dropout")
    modes = []
    logprobs = common.answer_logprobs
    monkeypatch.setattr(common, "answer_logprobs", lambda model, batch: (modes.append(model.training),
                                                                         logprobs(model, batch))[1])
    rows, log = run("ga", dropout, tmp_path / "probe")
    # per step: ga's forget forward, the probe's D_r forward, R(D_u) after the step (--geffect-order 1);
    # at the end R(D_r) after the last step
    assert modes == [True] * 7
    assert log[0]["reg"] > 0  # dropout: p differs from p_o (eval mode) even at theta_o
    assert all(r[k][g] != 0 for r in rows for k in ("unlearn", "retain") for g in geffect.GROUPS)
    plain = tmp_path / "plain"
    ga = importlib.import_module("ga")
    ga.main(["--model", dropout, "--data", "builtin", "--max-steps", "2", "--no-eval", "--batch-size", "4",
             "--out", str(plain)])
    keys = ("loss", "objective", "reg", "forget_nll", "retain_nll", "grad_norm")
    unprobed = [json.loads(line) for line in open(plain / "log.jsonl")]
    for a, b in zip(unprobed, log):
        assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-5, abs=1e-9)


def sequential_layers(monkeypatch):
    """Llama with its decoder layers in an nn.Sequential: no ModuleList of num_hidden_layers modules."""
    from transformers.models.llama import modeling_llama
    init = modeling_llama.LlamaModel.__init__

    def patched(self, config):
        init(self, config)
        self.layers = nn.Sequential(*self.layers)
    monkeypatch.setattr(modeling_llama.LlamaModel, "__init__", patched)


def test_layers_not_found(tiny_tokenizer, monkeypatch):
    model = build("llama", tiny_tokenizer)
    model.model.layers[0].mlp.experts = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])  # inner: ignored
    assert common.decoder_layers(model) is model.model.layers
    model.model.extra = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])  # a second one at the top: ambiguous
    with pytest.raises(common.UsageError, match=r"cannot find the decoder layers of this LlamaForCausalLM: it has 2"):
        geffect.param_groups(model)
    sequential_layers(monkeypatch)
    with pytest.raises(common.UsageError, match=r"it has no ModuleList\(s\) of config.num_hidden_layers \(3\)"):
        geffect.param_groups(build("llama", tiny_tokenizer))


@pytest.mark.parametrize("method", ["ga", "rmu"])
def test_layers_not_found_from_the_command_line(method, folders, tmp_path, monkeypatch, capsys):
    sequential_layers(monkeypatch)
    with pytest.raises(SystemExit) as e:
        run(method, folders["llama"], tmp_path / "x")
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "error: cannot find the decoder layers of this LlamaForCausalLM" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()
