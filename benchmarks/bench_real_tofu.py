"""
The tiny preset on the real TOFU (4000 rows, longer answers than the built-in set), on a CPU:
the time to build the tiny target model and its retain-only twin from scratch, the share of
forget05 answers the target model reproduces exactly, greedily, from the question, the main
command's ES before and after, and eval_tofu.py's Table 1 rows before and after unlearning on
real forget05 (FQ against the real retain-only model), beside the built-in set's row.

    python benchmarks/bench_real_tofu.py                  # the measurement: 57 minutes on 2 idle CPU cores
    python benchmarks/bench_real_tofu.py --quick          # the same steps, cut short: about 2-3 minutes

The data is --data, else $TOFU_DIR, else ../shared/tofu. Every step runs the project's own script
in a subprocess, as a user would; models and evaluations go to out/bench_real_tofu/. The result is
written to docs/real_tofu.json and into the results section of docs/real_tofu.md (--quick: to
out/bench_real_tofu_quick/ only, never to docs/). After a full run the two models are also put
where `--model tiny --data DIR` looks for them (common.tiny_dir), unless models are there already.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import eval_tofu  # noqa: E402

DOC = ROOT / "docs" / "real_tofu.md"
BEGIN, END = "<!-- results: written by benchmarks/bench_real_tofu.py -->", "<!-- end of results -->"
ROW_KEYS = ("es_exact_retain", "es_exact_unlearn", "es_perturb_retain", "es_perturb_unlearn", "model_utility",
            "log10_forget_quality")


def run(step, *argv):
    """One project script in a subprocess (its output shown as it comes); its wall time in seconds."""
    print(f"\n== {step}: python {' '.join(argv)}", flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True)
    return round(time.time() - t0, 1)


def exact_share(path, rows):
    """(rows reproduced exactly, rows): greedy decoding from the question gives the answer and then
    EOS, i.e. ES with EOS counted is 1 (one teacher-forced pass; eval_tofu.py's docstring says why)."""
    tok, model = common.load_tokenizer(path), common.load_model(path, frozen=True)
    es = eval_tofu.es_exact(model, tok, rows, common.QA_TEMPLATE, with_eos=True)
    return sum(e == 1 for e in es), len(es)


def table_row(s):
    return "| " + " | ".join("n/a" if s[k] is None else f"{s[k]:.4f}" for k in ROW_KEYS) + " |"


def markdown(r):
    """The results section of docs/real_tofu.md."""
    b, q = r["build"], r["exact"]
    pct = lambda k: f"{q[k][0]}/{q[k][1]} ({100 * q[k][0] / q[k][1]:.1f} %)"
    es = r["main_command"]
    lines = [BEGIN, "",
             f"Measured by `{r['command']}` on {r['date']}: {r['cpus']} CPUs, torch {r['torch']} with "
             f"{r['threads']} torch thread(s){' (--quick: cut short, not a measurement)' if r['quick'] else ''}; "
             f"data {r['data']}; total wall time {r['wall_s'] / 60:.1f} min.", "",
             f"The tiny model of this data: {r['model']['params'] / 1e6:.2f}M parameters, vocabulary "
             f"{r['model']['vocab']}, {r['model']['layers']} layers of width {r['model']['hidden']}; "
             f"{r['model']['epochs']:g} epochs at lr {r['model']['lr']:g}, batch {r['model']['batch']}.", "",
             "| what | measured | target |", "| --- | --- | --- |",
             f"| build the target model (`finetune.py --data DIR`) | {b['full_s'] / 60:.1f} min | ≤ 30 min |",
             f"| build the retain-only model (`--split retain95`) | {b['retain95_s'] / 60:.1f} min | |",
             f"| forget05 answers reproduced exactly, greedily, from the question | {pct('forget05')} | ≥ 80 % |",
             f"| the 400 held-out retain rows, likewise | {pct('retain_eval')} | |", "",
             f"The main command, `wga.py --alpha 5 --split forget05` on this data ({es['steps']} steps, "
             f"{es['seconds']:.0f} s): ES-exact forget {es['es_before']['forget']:.4f} -> "
             f"{es['es_after']['forget']:.4f} | retain {es['es_before']['retain']:.4f} -> "
             f"{es['es_after']['retain']:.4f}.", "",
             "`eval_tofu.py --split forget05`, FQ against the real retain-only model (retain95):", "",
             "| model | " + eval_tofu.TABLE1[2:], "| --- " * 7 + "|"]
    for name, key in (("built-in set, before unlearning", "builtin"), ("real TOFU, before unlearning", "before"),
                      ("real TOFU, after WGA", "after")):
        lines.append(f"| {name} " + table_row(r["eval"][key]["summary"]))
    lines += ["", "The parts of MU and the forget set's numbers, before unlearning, built-in set against real TOFU:",
              "", "| set | Prob. built-in | Prob. real | ROUGE-L built-in | ROUGE-L real | truth ratio built-in "
              "| truth ratio real |", "| --- " * 7 + "|"]
    for s in eval_tofu.SETS:
        m = [r["eval"][k]["metrics"][s] for k in ("builtin", "before")]
        lines.append(f"| {s} | " + " | ".join(f"{m[i][k]:.4f}" for k in ("prob", "rouge", "truth_ratio")
                                               for i in (0, 1)) + " |")
    return "\n".join(lines + ["", END])


def install(work, data):
    """Put the benchmark's models where `--model tiny --data DIR` finds them, unless models are there."""
    for name in ("full", "retain95"):
        dst = common.tiny_dir(data) / name
        if not (dst / "model.safetensors").exists():
            tmp = dst.with_name(name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(work / name, tmp)
            os.replace(tmp, dst)
            print(f"installed {dst}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("TOFU_DIR") or str(ROOT.parent / "shared" / "tofu"),
                   help="folder of the real TOFU files (default: $TOFU_DIR, else ../shared/tofu)")
    p.add_argument("--quick", action="store_true", help="every step cut short (20 fine-tune steps, 2 unlearning "
                                                        "steps, 20 rows per evaluation set): checks the pipeline only")
    args = p.parse_args(argv)
    data = common.data_source(args.data)
    if not os.path.isfile(os.path.join(data, "full.json")) and not os.path.isfile(os.path.join(data, "full.jsonl")):
        common.die(f"no TOFU files (full.json) in {args.data}: give --data or set TOFU_DIR")
    if not args.quick and not (BEGIN in DOC.read_text() and END in DOC.read_text()):
        common.die(f"{DOC} lacks the results markers, so the results would have nowhere to go")  # before an hour's work
    work = common.OUT / ("bench_real_tofu_quick" if args.quick else "bench_real_tofu")
    work.mkdir(parents=True, exist_ok=True)
    cut = ["--max-steps", "20"] if args.quick else []
    rows = ["--max-samples", "20", "--max-new-tokens", "20"] if args.quick else []
    t0 = time.time()

    build = {f"{s}_s": run(f"build {s}", "finetune.py", "--data", data, "--split", s, "--out", str(work / s),
                           "--overwrite", "--log-every", "100", *cut) for s in ("full", "retain95")}
    split = common.split_data("forget05", data)
    exact = dict(forget05=exact_share(str(work / "full"), split["forget"]),
                 retain_eval=exact_share(str(work / "full"), split["retain_eval"]))
    print(f"exact: {exact}", flush=True)
    lr = common.PRESETS["tiny"]["lr"]  # --model is a folder here, so the tiny preset's lr is given
    run("main command", "wga.py", "--alpha", "5", "--split", "forget05", "--model", str(work / "full"), "--data",
        data, "--lr", str(lr), "--out", str(work / "wga"), "--overwrite", "--log-every", "10",
        *(["--max-steps", "2"] if args.quick else []))
    main_command = json.loads((work / "wga" / "summary.json").read_text())
    evals = {}
    for key, model, extra in (("builtin", "tiny", []),
                              ("before", str(work / "full"), ["--data", data, "--retain-model", str(work / "retain95")]),
                              ("after", str(work / "wga"), ["--data", data, "--retain-model", str(work / "retain95")])):
        out = work / f"eval-{key}.json"
        run(f"eval {key}", "eval_tofu.py", "--model", model, "--split", "forget05", "--out", str(out), *extra, *rows)
        d = json.loads(out.read_text())
        evals[key] = dict(summary=d["summary"], metrics=d["metrics"], seconds=d["seconds"])

    cfg = json.loads((work / "full" / "config.json").read_text())
    ft = json.loads((work / "full" / "args.json").read_text())
    import torch
    from safetensors import safe_open
    with safe_open(str(work / "full" / "model.safetensors"), "pt") as f:
        params = sum(f.get_tensor(k).numel() for k in f.keys())
    result = dict(command="python benchmarks/bench_real_tofu.py" + (" --quick" if args.quick else ""),
                  date=time.strftime("%Y-%m-%d"), quick=args.quick, data=data, cpus=os.cpu_count(),
                  threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.processor() or None,
                  wall_s=round(time.time() - t0, 1), build=build, exact=exact,
                  model=dict(params=params, vocab=cfg["vocab_size"], layers=cfg["num_hidden_layers"],
                             hidden=cfg["hidden_size"], epochs=ft["epochs"], lr=ft["lr"], batch=ft["batch_size"]),
                  main_command=dict(es_before=main_command["es_before"], es_after=main_command["es_after"],
                                    steps=main_command["steps"], seconds=main_command["seconds"]),
                  eval=evals)
    section = markdown(result)
    if args.quick:
        eval_tofu.write_json(str(work / "real_tofu.json"), result)
        (work / "real_tofu.md").write_text(section + "\n")
        print(f"\n{section}\n\nwrote {work / 'real_tofu.json'} and {work / 'real_tofu.md'} (--quick: docs/ untouched)")
        return result
    doc = DOC.read_text()
    eval_tofu.write_json(str(DOC.with_suffix(".json")), result)
    tmp = DOC.with_name(DOC.name + ".tmp")
    tmp.write_text(doc[:doc.index(BEGIN)] + section + doc[doc.index(END) + len(END):])
    os.replace(tmp, DOC)
    install(work, data)
    print(f"\n{section}\n\nwrote {DOC} and {DOC.with_suffix('.json')}")
    return result


if __name__ == "__main__":
    main()
