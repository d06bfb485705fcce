"""Data, tokenization, log-probabilities, schedule, saving and finetune.py."""
import argparse
import json
import math
import os

import pytest
import torch

import common
import fictitious
from conftest import run_main, run_script

QA = common.QA_TEMPLATE
INST = "[INST] {q} [/INST]{a}"


# ----------------------------------------------------------------------------- the built-in set

def test_generator_is_deterministic(tmp_path):
    a, b = fictitious.generate(), fictitious.generate()
    assert a == b
    r = run_script("fictitious.py", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    for name, rows in a.items():
        with open(tmp_path / f"{name}.json") as f:
            assert [json.loads(line) for line in f] == rows


def test_builtin_shape():
    d = fictitious.generate()
    n = len(fictitious.QA)
    assert len(d["full"]) == fictitious.N_AUTHORS * n
    for pct in (1, 5, 10):
        forget, retain = d[f"forget{pct:02d}"], d[f"retain{100 - pct}"]
        assert len(forget) >= n and len(forget) % n == 0  # whole authors, at least one
        assert retain + forget == d["full"]  # forget = the last authors
        assert [r["question"] for r in d[f"forget{pct:02d}_perturbed"]] == [r["question"] for r in forget]
        assert not {r["question"] for r in d[f"holdout{pct:02d}"]} & {r["question"] for r in d["full"]}
    assert [r["question"] for r in d["retain_perturbed"]] == [r["question"] for r in d["full"][:400]]
    for r in d["forget10_perturbed"] + d["retain_perturbed"]:
        assert len(r["perturbed_answer"]) == 5 and len(set(r["perturbed_answer"])) == 5
        assert r["paraphrased_answer"] not in r["perturbed_answer"] and r["paraphrased_question"] != r["question"]
    for c in ("real_authors", "world_facts"):
        for r, p in zip(d[c], d[c + "_perturbed"]):
            options = [r[f"option{i}"] for i in range(1, 5)]
            assert r["answer"] in options and len(set(options)) == 4
            assert sorted(p["perturbed_answer"] + [p["answer"]]) == sorted(options)
    assert len({r["question"] for r in d["full"]}) == len(d["full"])  # every question names one answer


def test_builtin_schema_equals_real(tofu_dir):
    d = fictitious.generate()
    for config in common.CONFIG_FIELDS:
        real = common.load_tofu(config, tofu_dir)
        assert set(d[config][0]) == set(real[0]), config
        for k, v in real[0].items():
            assert type(d[config][0][k]) is type(v), (config, k)
            if isinstance(v, list):
                assert len(d[config][0][k]) == len(v), (config, k)


def test_loader_reads_every_real_config(tofu_dir):
    sizes = dict(full=4000, forget01=40, forget05=200, forget10=400, retain99=3960, retain95=3800, retain90=3600,
                 retain_perturbed=400, real_authors=100, world_facts=117, holdout05=200)
    for config in common.CONFIG_FIELDS:
        rows = common.load_tofu(config, tofu_dir)
        assert rows and all(set(common.CONFIG_FIELDS[config]) <= set(r) for r in rows)
        if config in sizes:
            assert len(rows) == sizes[config], config


@pytest.mark.parametrize("source", ["builtin", "real"])
def test_split_arithmetic(source, request):
    data = request.getfixturevalue("tofu_dir") if source == "real" else "builtin"
    full = common.load_tofu("full", data)
    held = common.load_tofu("retain_perturbed", data)
    for split in common.SPLITS:
        s = common.split_data(split, data)
        assert len(s["retain_eval"]) == common.N_EVAL
        assert s["retain_eval"] + s["retain_train"] + s["forget"] == full
        assert [r["question"] for r in s["retain_eval"]] == [r["question"] for r in held]


def test_loader_errors(tmp_path):
    with pytest.raises(common.UsageError, match="unknown TOFU config"):
        common.load_tofu("forget07", "builtin")
    with pytest.raises(common.UsageError, match="unknown split"):
        common.split_data("full", "builtin")
    with pytest.raises(common.UsageError, match="does not exist"):
        common.load_tofu("full", str(tmp_path / "nowhere"))
    with pytest.raises(common.UsageError, match="not found: tried"):
        common.load_tofu("full", str(tmp_path))
    (tmp_path / "full.json").write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    with pytest.raises(common.UsageError, match="not valid JSON"):
        common.load_tofu("full", str(tmp_path))
    (tmp_path / "full.json").write_text('[{"question": "q", "answer": "a"}, {"question": "q"}]')
    with pytest.raises(common.UsageError, match="row 1 .* lacks field.*answer"):
        common.load_tofu("full", str(tmp_path))
    (tmp_path / "forget05.jsonl").write_text("")
    with pytest.raises(common.UsageError, match="has no rows"):
        common.load_tofu("forget05", str(tmp_path))
    (tmp_path / "forget01.json").write_text('{"question": "q", "answer": "a"}\n')
    (tmp_path / "retain99.json").write_text('{"question": "q", "answer": "a"}\n' * 400)
    with pytest.raises(common.UsageError, match="more than 400"):
        common.split_data("forget01", str(tmp_path))


# ----------------------------------------------------------------------------- tokenization and masking

@pytest.mark.parametrize("template", [QA, INST])
def test_mask_covers_answer_and_eos(template, tiny_tokenizer):
    tok = tiny_tokenizer
    for r in fictitious.generate()["forget05"][:20]:
        e = common.encode(tok, template, r["question"], r["answer"])
        ids, labels = e["input_ids"], e["labels"]
        assert len(ids) == len(labels) and ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
        n = labels.count(-100)
        assert labels[:n] == [-100] * n and -100 not in labels[n:] and labels[n:] == ids[n:]
        assert ids[:n] == e["prompt_ids"][:n]  # the prompt as the model sees it at generation time
        answer = tok.decode(ids[n:-1])
        assert answer.strip() == r["answer"] and tok.decode(ids[:n]).strip() == template.split("{a}")[0].replace(
            "{q}", r["question"]).strip()


def test_mask_when_the_prompt_does_not_tokenize_as_a_prefix(tiny_tokenizer):
    """If the last prompt token merges with the answer, the merged token counts as answer."""
    tok = tiny_tokenizer
    e = common.encode(tok, "Q: {q} A{a}", "Who?", "nswer is here")  # 'A' + 'nswer' may merge
    n = e["labels"].count(-100)
    assert e["input_ids"][:n] == e["prompt_ids"][:n]
    assert tok.decode(e["input_ids"][n:-1]).endswith("nswer is here")


def test_collate_pads_dynamically(tiny_tokenizer):
    rows = fictitious.generate()["full"][:4]
    ex = common.encode_rows(tiny_tokenizer, QA, rows)
    b = common.collate(ex, tiny_tokenizer.pad_token_id)
    lens = [len(e["input_ids"]) for e in ex]
    assert b["input_ids"].shape == (4, max(lens))  # longest in the batch, no fixed padding
    assert b["attention_mask"].sum(1).tolist() == lens
    assert ((b["labels"] != -100).sum(1)).tolist() == [sum(t != -100 for t in e["labels"]) for e in ex]
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()


def test_token_logprobs_by_hand():
    torch.manual_seed(0)
    B, T, V = 3, 6, 11
    logits = torch.randn(B, T, V, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T))
    labels = ids.clone()
    labels[:, :2] = -100
    labels[2, 4:] = -100  # padding
    logp, mask = common.token_logprobs(logits, labels)
    assert logp.shape == mask.shape == (B, T - 1)
    for b in range(B):
        for t in range(T - 1):
            if labels[b, t + 1] == -100:
                assert not mask[b, t] and logp[b, t] == 0
            else:
                z = logits[b, t]
                want = z[ids[b, t + 1]] - math.log(sum(math.exp(x) for x in z.tolist()))
                assert mask[b, t] and abs(logp[b, t].item() - want) < 1e-6


def test_answer_logprobs_on_a_model(tiny_tokenizer):
    import finetune
    model = finetune.tiny_model(tiny_tokenizer, seed=0).double()
    ex = common.encode_rows(tiny_tokenizer, QA, fictitious.generate()["full"][:3])
    b = common.collate(ex, tiny_tokenizer.pad_token_id)
    logp, mask = common.answer_logprobs(model, b)
    for i, e in enumerate(ex):  # each row alone, unpadded, token by token
        ids = torch.tensor([e["input_ids"]])
        lp = model(input_ids=ids).logits[0].log_softmax(-1)
        n = e["labels"].count(-100)
        want = [lp[t - 1, ids[0, t]].item() for t in range(n, len(e["input_ids"]))]
        got = logp[i][mask[i]].tolist()
        assert len(got) == len(want) and max(abs(g - w) for g, w in zip(got, want)) < 1e-9


# ----------------------------------------------------------------------------- schedule and batches

def test_lr_schedule():
    lrs = [common.lr_at(s, 10, 4, 1.0) for s in range(10)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0 and lrs[-1] == pytest.approx(1 / 6)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_epoch_batches_cover_each_row_once():
    b = common.epoch_batches(37, 16, seed=3, epoch=1)
    assert [len(x) for x in b] == [16, 16, 5] and sorted(sum(b, [])) == list(range(37))
    assert b == common.epoch_batches(37, 16, 3, 1) and b != common.epoch_batches(37, 16, 3, 2)


# ----------------------------------------------------------------------------- finetune.py and saving

def test_finetune_smoke(tmp_path):
    out = tmp_path / "run"
    r = run_script("finetune.py", "--max-steps", "2", "--batch-size", "8", "--grad-accum", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "step 2/2" in r.stdout
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 6 and tok.eos_token == "</s>"
    assert (out / "model.safetensors").is_file() and not (tmp_path / "run.tmp").exists()
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [x["step"] for x in log] == [1, 2] and all(math.isfinite(x["loss"]) for x in log)
    args = json.load(open(out / "args.json"))
    assert args["batch_size"] == 8 and args["torch"] == torch.__version__ and "finetune.py" in args["command"]


def test_grad_accum_is_exact(tiny_tokenizer):
    """Two micro-batches give the gradient of the whole batch (token mean over the batch)."""
    import finetune
    model = finetune.tiny_model(tiny_tokenizer, seed=0).double()
    ex = common.encode_rows(tiny_tokenizer, QA, fictitious.generate()["full"][:4])
    n_tok = sum(sum(t != -100 for t in e["labels"]) for e in ex)
    grads = []
    for chunks in ([ex], [ex[:2], ex[2:]]):
        model.zero_grad()
        for c in chunks:
            logp, mask = common.answer_logprobs(model, common.collate(c, tiny_tokenizer.pad_token_id))
            (-(logp * mask).sum() / n_tok).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-12)


def test_interrupted_run_leaves_no_model(tmp_path):
    class A:
        pass
    run = common.Run(str(tmp_path / "r"), A())
    run.log(dict(step=1))
    assert not (tmp_path / "r").exists() and (tmp_path / "r.tmp" / "log.jsonl").is_file()


@pytest.mark.parametrize("argv,msg", [
    (["--split", "forget07"], "unknown TOFU config"),
    (["--data", "./no/such/folder"], "does not exist"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--batch-size", "5000"], "larger than the 1090 training rows"),
    (["--grad-accum", "3"], "must divide"),
    (["--template", "{a} then {q}"], "must contain {q} and then {a}"),
])
def test_finetune_bad_input(argv, msg, tmp_path):
    r = run_main("finetune.py", "--out", str(tmp_path / "x"), *argv)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- the tiny target model

def test_tiny_model_memorises_forget05(tiny_path):
    """The default tiny fine-tune reproduces >= 90% of forget05 answers exactly, greedily."""
    tok = common.load_tokenizer(tiny_path)
    model = common.load_model(tiny_path, frozen=True)
    ex = common.encode_rows(tok, QA, common.load_tofu("forget05", "builtin"))
    exact = 0
    for e in ex:
        prompt = torch.tensor([e["prompt_ids"]])
        want = e["input_ids"][len(e["prompt_ids"]):]
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(want) + 2,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        exact += out[0, prompt.shape[1]:].tolist()[:len(want)] == want
    assert exact / len(ex) >= 0.9, f"{exact}/{len(ex)}"


def test_chunks_cover_rows_in_order():
    assert common.chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert common.chunks(list(range(2)), 2) == [[0], [1]]
    assert [len(c) for c in common.chunks(list(range(16)), 4)] == [4, 4, 4, 4]


@pytest.mark.parametrize("method,reg", [("ga", "none"), ("npo", "gd"), ("wga", "kl"), ("po", "rr"), ("rmu", "kl")])
def test_grad_accum_step_equals_the_whole_batch(method, reg, tiny_path, tmp_path):
    """--grad-accum 4 takes the step of --grad-accum 1 on every step, the epoch's short last batch
    included (forget05: 50 rows = 3 x 16 + 2, so step 4 has 2 forget rows and 16 retain rows)."""
    import importlib
    from safetensors.torch import load_file
    weights = {}
    for k in (1, 4):
        out = tmp_path / f"k{k}"
        importlib.import_module(method).main(["--reg", reg, "--max-steps", "4", "--grad-accum", str(k), "--optim", "sgd",
                                              "--lr", "0.5", "--no-eval", "--out", str(out)])
        weights[k] = load_file(out / "model.safetensors")
    start = load_file(os.path.join(tiny_path, "model.safetensors"))
    moved = max((weights[1][n] - start[n]).abs().max().item() for n in start)
    worst = max((weights[4][n] - weights[1][n]).abs().max().item() for n in start)
    assert moved > 1e-3 and worst <= 1e-4 * moved, (moved, worst)  # float32 noise: ~2e-5 of the change


def test_short_batch_uses_every_retain_row(tiny_tokenizer):
    """The micro-batches of a step hold all of its forget and retain rows, also when the forget batch is short."""
    args = argparse.Namespace(batch_size=16, grad_accum=4, seed=0)
    data = common.split_data("forget05", "builtin")
    forget = common.encode_rows(tiny_tokenizer, QA, data["forget"])
    retain = common.encode_rows(tiny_tokenizer, QA, data["retain_train"])
    for micro, n in common.unlearn_batches(forget, retain, args, 4, tiny_tokenizer.pad_token_id, "cpu"):
        sides = [sum(int((b["labels"] != -100).sum()) for b in side) for side in zip(*micro)]
        assert sides == [n["forget_tok"], n["retain_tok"]]
        assert sum(len(r["input_ids"]) for _, r in micro) == 16
    assert len(micro) == 2 and [len(f["input_ids"]) for f, _ in micro] == [1, 1]  # step 4: 2 forget rows
