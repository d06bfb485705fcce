"""--log-token-weights (wga.py, tnpo.py, wtnpo.py) and `figures.py tokens`: the logged weights are the
loss's, row by row and token by token; the page shows and escapes them; bad input writes nothing."""
import json
from collections import Counter

import pytest
import torch

import common
import tnpo
from conftest import run_main

RUN_FLAGS = ["--split", "forget05", "--no-eval", "--no-save", "--log-token-weights", "--overwrite"]


def logged(run_dir):
    return [json.loads(line) for line in open(run_dir / "token_weights.jsonl")]


@pytest.fixture(scope="module")
def tnpo_run(tmp_path_factory, tiny_path):
    """8 TNPO steps (2 epochs of forget05's 50 rows in batches of 16, 2 micro-batches each), recording what the
    loop's forward gave the loss: (step, the micro-batch's rows, logp, mask, ref_logp) of every forget micro-batch."""
    out = tmp_path_factory.mktemp("tw") / "tnpo"
    seen, forward = [], common.answer_logprobs

    def recording(model, batch):
        logp, mask = forward(model, batch)
        if "rows" in batch:
            seen.append((batch["step"] + 1, list(batch["rows"]), logp.detach().clone(), mask, batch["ref_logp"]))
        return logp, mask
    mp = pytest.MonkeyPatch()
    mp.setattr(common, "answer_logprobs", recording)
    try:
        r = run_main("tnpo.py", *RUN_FLAGS, "--max-steps", 8, "--grad-accum", 2, "--out", out)
    finally:
        mp.undo()
    assert r.returncode == 0, r.stderr
    return out, logged(out), seen


def test_tnpo_logged_weights_are_the_loss_weights(tnpo_run):
    _, rows, seen = tnpo_run
    by_key = {(r["step"], r["row"]): r["weights"] for r in rows}
    assert len(by_key) == len(rows) == sum(len(s[1]) for s in seen)
    moved = 0.0
    for step, batch_rows, logp, mask, ref_logp in seen:
        w = tnpo.tnpo_loss(logp, ref_logp, mask, 4.0, 1)[1]["token_weight"]  # the default beta for forget05
        by_hand = 2 * torch.sigmoid(4.0 * (logp - ref_logp))  # eq. 6's weight, written out
        for b, row in enumerate(batch_rows):
            got = torch.tensor(by_key[(step, row)])
            assert torch.equal(got, w[b][mask[b]])
            assert torch.allclose(got, by_hand[b][mask[b]], rtol=1e-6, atol=0)
            moved = max(moved, (got - 1).abs().max().item())
    assert all(w == 1.0 for r in rows if r["step"] == 1 for w in r["weights"])  # theta = theta_o: p = p_o
    assert moved > 1e-3  # and later steps are not all 1


def test_rows_once_per_epoch_and_tokens_join_back(tnpo_run, tiny_path):
    out, rows, _ = tnpo_run
    forget = common.load_tofu("forget05")
    per_epoch = Counter((r["epoch"], r["row"]) for r in rows)
    assert sorted(per_epoch) == [(e, i) for e in (1, 2) for i in range(len(forget))]
    assert set(per_epoch.values()) == {1}
    assert [r["epoch"] for r in rows] == sorted(r["epoch"] for r in rows)
    assert {r["step"] for r in rows if r["epoch"] == 2} == {5, 6, 7, 8}
    eos = common.load_tokenizer(tiny_path).eos_token
    for r in rows:
        assert "".join(r["tokens"]) == " " + forget[r["row"]]["answer"] + eos  # the prompt's space goes with it
        assert r["question"] == forget[r["row"]]["question"]
        assert len(r["tokens"]) == len(r["weights"])


def test_wga_weights_are_p_alpha_of_the_original_model(tmp_path, tiny_path):
    """At step 1 the model is the original one: each logged weight is p^alpha of its token, recomputed here
    from the row alone (no batch, no padding)."""
    r = run_main("wga.py", *RUN_FLAGS, "--max-steps", 1, "--reg", "none", "--out", tmp_path / "wga")
    assert r.returncode == 0, r.stderr
    rows = logged(tmp_path / "wga")
    assert len(rows) == 16 and {x["step"] for x in rows} == {1}
    tok = common.load_tokenizer(tiny_path)
    model = common.load_model(tiny_path, frozen=True)
    forget = common.load_tofu("forget05")
    for x in rows:
        ex = common.encode(tok, common.QA_TEMPLATE, forget[x["row"]]["question"], forget[x["row"]]["answer"])
        with torch.no_grad():
            logp, mask = common.answer_logprobs(model, common.collate([ex], tok.pad_token_id))
        want = (5.0 * logp[0][mask[0]]).exp()
        assert torch.allclose(torch.tensor(x["weights"]), want, rtol=1e-3, atol=1e-7)
    assert min(w for x in rows for w in x["weights"]) < 0.9  # p^5 is not 1 everywhere: the test can fail


def fake_run(folder, command="tnpo.py --split forget05", epochs=(1, 2)):
    """A run folder with hand-written token weights: text that HTML must escape, known weights."""
    folder.mkdir()
    (folder / "args.json").write_text(json.dumps(dict(command=command)))
    rows = []
    for e in epochs:
        rows.append(dict(step=e, epoch=e, row=0, question="Is 1 < 2 & 3 > 2?", tokens=[" Yes", " <b>", " &", "</s>"],
                         weights=[0.5 * e, 0.25, 1e-6, 1.0]))
        rows.append(dict(step=e, epoch=e, row=3, question="Q3", tokens=[" no"], weights=[0.125]))
    (folder / "token_weights.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_page_escapes_and_shows_each_weight(tmp_path):
    fake_run(tmp_path / "run")
    page = tmp_path / "page.html"
    r = run_main("figures.py", "tokens", tmp_path / "run", "--rows", 0, "--epochs", 1, 2, "-o", page)
    assert r.returncode == 0, r.stderr
    html = page.read_text()
    assert "<b>" not in html and "&lt;b&gt;" in html and "Is 1 &lt; 2 &amp; 3 &gt; 2?" in html
    assert "<script" not in html and "http" not in html  # self-contained
    spans = html.split('<span class="t" ')[1:]
    assert len(spans) == 8  # 4 tokens x 2 epochs, row 3 not asked for
    titles = [s.split('title="')[1].split('"')[0] for s in spans]
    assert titles == ["0.5", "0.25", "1e-06", "1", "1", "0.25", "1e-06", "1"]
    assert [s.split(">")[1].split("</span")[0] for s in spans[:4]] == [" Yes", " &lt;b&gt;", " &amp;", "&lt;/s&gt;"]
    assert "TNPO" in html and "one scale per run" in html
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "page.png", "run"]  # no tmp file left


@pytest.mark.parametrize("args, says", [
    (["{empty}"], "token_weights.jsonl does not exist"),
    (["{run}", "--rows", 0, 7], "forget row 7 is not in /"),
    (["{run}", "--rows", 1], "(it has rows 0, 3)"),
    (["{run}", "--rows", 0, "--epochs", 1, 6], "epoch 6 is not in"),
    (["{run}", "-o", "{tmp}/page.png"], "-o must name an .html file"),
    (["{broken}"], "a row needs epoch, question, row, step, tokens, weights, with one weight per token"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, says):
    fake_run(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()  # a row whose weights are missing
    (tmp_path / "broken" / "token_weights.jsonl").write_text(json.dumps(dict(step=1, epoch=1, row=0, question="q",
                                                                             tokens=["a"])) + "\n")
    args = [str(a).format(run=tmp_path / "run", empty=tmp_path / "empty", broken=tmp_path / "broken", tmp=tmp_path)
            for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "page.html")]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = run_main("figures.py", "tokens", *args)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and says in r.stderr and r.stderr.startswith("figures.py: error: ")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_refused_under_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = run_main("wtnpo.py", *RUN_FLAGS, "--out", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.strip().endswith("--log-token-weights runs in one process only (not under "
                                                           "torchrun)")
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "x").exists()
