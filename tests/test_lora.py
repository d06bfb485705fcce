"""LoRA adapters (peft): only the adapters train, the reference is the base with them off, the saved
folder is theta_o + BA beside its adapter, UWC scales the adapter exactly as mixing the merged weights,
the G-effect on adapters matches a finite difference, and a run is reproducible."""
import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import common
import ga
import geffect
import rmu
import uwc
import wga
from conftest import run_main, run_script
from test_geffect import risk, sgd_change, small_model

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def lora_args(r=4, alpha=8.0, targets="all-linear"):
    return argparse.Namespace(lora_r=r, lora_alpha=alpha, lora_dropout=0.0, lora_targets=targets, seed=0)


def some_batch(tokenizer, n=4):
    rows = common.load_tofu("forget05")[:n]
    return common.collate(common.encode_rows(tokenizer, common.QA_TEMPLATE, rows), tokenizer.pad_token_id)


def perturb_b_(model, scale=0.05):
    """B = 0 at the start (the adapted model is theta_o): give it values, as after training."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, scale)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_path):
    """A short WGA run with LoRA r=4 and the KL regularizer (the reference: the adapters off)."""
    out = tmp_path_factory.mktemp("lora") / "wga"
    wga.main(["--split", "forget01", "--lora-r", "4", "--lora-alpha", "8", "--lr", "0.03", "--max-steps", "4",
              "--no-eval", "--out", str(out)])
    return out


def test_only_the_adapters_train_and_the_reference_is_theta_o(tiny_path):
    tokenizer = common.load_tokenizer(tiny_path)
    model = common.load_model(tiny_path, lora=lora_args())
    original = common.load_model(tiny_path, frozen=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[1] for n in trainable if ".lora_A." in n}
    assert adapted == PROJECTIONS  # every attention and MLP projection, the output layer not
    layers = {n.split(".layers.")[1].split(".")[0] for n in trainable}
    assert layers == {str(i) for i in range(model.config.num_hidden_layers)}
    batch = some_batch(tokenizer)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        at_start = model(**inputs).logits
        assert torch.equal(at_start, original(**inputs).logits)  # B = 0: the adapted model is theta_o
        perturb_b_(model)
        model.train()
        modes = []
        hook = common.decoder_layers(model)[0].register_forward_pre_hook(lambda m, _: modes.append(m.training))
        ref = common.AdaptersOff(model)(**inputs, output_hidden_states=True)
        hook.remove()
        assert modes == [False]  # the reference runs in eval mode (no dropout), as a frozen model does
        want = original(**inputs, output_hidden_states=True)
        assert model.training  # the reference's eval mode does not leak into training
        assert torch.equal(ref.logits, want.logits)
        assert all(torch.equal(a, b) for a, b in zip(ref.hidden_states, want.hidden_states))  # RR and RMU use them
        assert not torch.allclose(model(**inputs).logits, want.logits)


def test_the_reference_is_no_second_copy(tiny_path):
    args = argparse.Namespace(model="tiny", data="builtin", split="forget01", batch_size=None, grad_accum=1,
                              trust_remote_code=False, reg="kl", rr_layer=3, **vars(lora_args()))
    _, _, model, ref = common.load_for_unlearning(args, reference=True)
    assert isinstance(ref, common.AdaptersOff) and ref.model is model
    assert ref.config.num_hidden_layers == model.config.num_hidden_layers


def check_merged(run, base, scale) -> int:
    """Every tensor of run/model.safetensors is base's + scale * B A of run/adapter, or base's own bytes
    where there is no adapter; returns how many adapted tensors moved."""
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    merged = load_file(run / "model.safetensors")
    theta_o = load_file(f"{base}/model.safetensors")
    assert set(merged) == set(theta_o)
    changed = 0
    for name, w in merged.items():
        a = next((v for k, v in adapter.items() if k.endswith(name.replace(".weight", ".lora_A.weight"))), None)
        if a is None:
            assert torch.equal(w, theta_o[name]), name  # embeddings, norms, output layer: untouched
            continue
        b = next(v for k, v in adapter.items() if k.endswith(name.replace(".weight", ".lora_B.weight")))
        torch.testing.assert_close(w, theta_o[name] + scale * b @ a, rtol=0, atol=1e-6)
        changed += not torch.equal(w, theta_o[name])
    return changed


def test_saved_folder_is_theta_o_plus_ba_beside_its_adapter(lora_run, tiny_path):
    cfg = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert check_merged(lora_run, tiny_path, 8 / 4) == 7 * 6  # training moved every adapter (B left 0)
    model = AutoModelForCausalLM.from_pretrained(lora_run)  # an ordinary folder
    theta_o = load_file(f"{tiny_path}/model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in theta_o.values())


def test_uwc_scales_the_adapter_as_mixing_the_merged_weights(lora_run, tiny_path, tmp_path):
    from peft import PeftModel
    tokenizer = common.load_tokenizer(tiny_path)
    batch = some_batch(tokenizer, 8)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with common.quiet_peft():
        scaled = PeftModel.from_pretrained(common.load_model(tiny_path, frozen=True), lora_run / "adapter").eval()
    set_lam = uwc.scale_adapter(scaled)
    mixed = common.load_model(str(lora_run), frozen=True)
    base, unlearned = uwc.safetensors_files(tiny_path), uwc.safetensors_files(str(lora_run))
    with torch.no_grad():
        for lam in (0.0, 0.37, 1.0):
            set_lam(lam)
            uwc.mix_(mixed, base, unlearned, lam)
            torch.testing.assert_close(scaled(**inputs).logits, mixed(**inputs).logits, rtol=0, atol=1e-4)
    # the whole search: the adapter path and the merged-weights path (adapter/ removed) find the same lam*
    plain = tmp_path / "merged-only"
    shutil.copytree(lora_run, plain)
    shutil.rmtree(plain / "adapter")
    got = {}
    for folder in (lora_run, plain):
        res = uwc.main(["--model", str(folder), "--split", "forget01", "--tol", "0.02", "--no-fq",
                        "--max-samples", "10", "--out", str(tmp_path / f"{folder.name}-uwc")])
        got[folder.name] = res
    a, b = got[lora_run.name], got["merged-only"]
    assert a["lam"] == b["lam"] and len(a["probes"]) == len(b["probes"]) > 1  # a real search, not lam = 1
    for pa, pb in zip(a["probes"], b["probes"]):
        assert pa["retain_es"] == pytest.approx(pb["retain_es"], abs=2e-3)
    # the mixed model: theta_o + lam* B A, saved merged with its adapter scaled by lam*
    mixed_run = tmp_path / f"{lora_run.name}-uwc"
    trained = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    scaled_b = load_file(mixed_run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(scaled_b[k], trained[k] * a["lam"] if "lora_B" in k else trained[k]) for k in trained)
    assert check_merged(mixed_run, tiny_path, 8 / 4) == 7 * 6


def test_geffect_on_adapters_matches_an_sgd_step(tiny_tokenizer, tmp_path):
    model = common.add_lora(small_model(tiny_tokenizer), lora_args(r=2, alpha=4.0))
    model.double()
    perturb_b_(model, 0.3)  # B = 0 would leave A without gradient
    ref = common.AdaptersOff(model)
    args = argparse.Namespace(geffect_every=1, geffect_retain=6, geffect_pointwise=False, geffect_dr="heldout",
                              template=common.QA_TEMPLATE, batch_size=4, grad_accum=2, seed=0)
    data = common.split_data("forget05", "builtin")
    forget = common.encode_rows(tiny_tokenizer, args.template, data["forget"])
    retain = common.encode_rows(tiny_tokenizer, args.template, data["retain_train"])
    probe = geffect.Probe(args, model, tiny_tokenizer, data["retain_eval"], tmp_path)
    assert {g for _, _, g, _ in probe.params} == {"shallow", "middle", "deep"}  # the adapters sit in the layers
    micro, n = next(common.unlearn_batches(forget, retain, args, 1, tiny_tokenizer.pad_token_id, "cpu"))
    for forget_batch, retain_batch in micro:
        logp, mask = common.answer_logprobs(model, forget_batch)
        loss, _ = ga.ga_loss(logp, mask, n["forget_tok"])
        r, _ = common.regularizer("kl", model, ref, retain_batch, n["retain_tok"])
        probe.backward(loss, r, logp, mask, forget_batch)
    probe.close()
    row = json.loads((tmp_path / "geffect.jsonl").read_text())
    assert row["terms"]["reg"]["unlearn"] != 0  # KL away from theta_o: B != 0
    for key, batches in (("unlearn", [f for f, _ in micro]), ("retain", probe.d_r)):
        assert row[key]["embed"] == 0 and row[key]["lm"] == 0
        for groups in (geffect.GROUPS, ("shallow",), ("middle",), ("deep",)):
            want = row[key]["total"] if len(groups) > 1 else row[key][groups[0]]
            got = sgd_change(model, batches, groups, 1e-4)  # B A is bilinear: a shorter step than test_geffect's
            assert got == pytest.approx(want, rel=0.02, abs=1e-6), (key, groups, got, want)
    assert risk(model, probe.d_r) > 0


def adapter_after(tmp_path, name, *flags):
    out = tmp_path / name
    rmu.main(["--split", "forget01", "--lora-r", "4", "--max-steps", "3", "--no-eval", "--reg", "rr",
              "--out", str(out), *flags])
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_rmu_with_rr_is_reproducible_and_grad_accum_is_one_step(tmp_path, tiny_path):
    a = adapter_after(tmp_path, "a", "--optim", "sgd", "--batch-size", "4")
    b = adapter_after(tmp_path, "b", "--optim", "sgd", "--batch-size", "4")
    c = adapter_after(tmp_path, "c", "--optim", "sgd", "--batch-size", "4", "--grad-accum", "2")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same adapters
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-7)


def test_finetune_with_lora_saves_an_ordinary_folder(tmp_path, tiny_path):
    import finetune
    out = tmp_path / "ft"
    finetune.main(["--model", tiny_path, "--data", "builtin", "--split", "retain99", "--lora-r", "2",
                   "--lr", "1e-2", "--max-steps", "2", "--out", str(out)])
    assert check_merged(out, tiny_path, 32 / 2) == 7 * 6  # alpha 32 by default; only the adapters trained
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("flags,says", [(["--lora-r", "-1"], "--lora-r must be >= 0"),
                                        (["--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout in [0, 1)"),
                                        (["--lora-r", "4", "--lora-targets", "no_such_proj"], "--lora-targets"),
                                        (["finetune.py", "--lora-r", "4"], "the tiny preset starts from random"),
                                        (["rmu.py", "--lora-r", "4", "--layer", "0"], "--layer 0 is the embeddings")])
def test_bad_lora_flags_say_one_line_and_write_nothing(flags, says, tmp_path, tiny_path):
    out = tmp_path / "bad"
    run = run_script if "--lora-targets" in flags else run_main  # peft's own error, seen from the command line
    script = "ga.py"
    if flags[0] in ("finetune.py", "rmu.py"):
        script, flags = flags[0], flags[1:]
    r = run(script, "--split", "forget01" if script != "finetune.py" else "full", "--max-steps", "1",
            "--out", str(out), *flags)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and not (tmp_path / "bad.tmp").exists()


def test_lora_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setattr(common, "world", lambda: (0, 2))
    with pytest.raises(common.UsageError, match="one process"):
        common.check_lora(lora_args())


@pytest.mark.parametrize("reg", ["none", "gd"])
def test_lora_without_a_reference(reg, tmp_path, tiny_path):
    r = run_main("npo.py", "--split", "forget01", "--lora-r", "2", "--reg", reg, "--max-steps", "1", "--no-eval",
                 "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "LoRA r=2 alpha=32 on all-linear: 0.031M of" in r.stdout  # 6 layers x 7 projections x 2 x (d_in + d_out)
