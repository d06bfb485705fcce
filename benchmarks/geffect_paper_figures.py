"""
The paper's other G-effect figures on forget05 of the built-in set (tiny model, 20 steps, every
step measured), drawn by `figures.py panels` and `figures.py pointwise` into docs/:

    OMP_NUM_THREADS=1 python benchmarks/geffect_paper_figures.py    # 15 runs: 767 s (13 min) on 2 busy cores
    python benchmarks/geffect_paper_figures.py --draw-only          # redraw from the runs already in out/figures/paper/

- NPO, beta 0.5 / 1 / 2, no regularizer, with --geffect-pointwise: docs/geffect_npo_beta.png (Figures 4/11),
  docs/geffect_npo_pointwise.png (Figure 16: checkpoints 5, 10, 15 joined) and
  docs/geffect_npo_pointwise_steps.png (Figure 17: beta 1, each checkpoint apart);
- RMU, hidden state 2 / 4 / 6 of the tiny model's 6 layers (the paper's 11th / 22nd / 33rd: a third,
  two thirds, the last) x c 0 / 1 / 5, no regularizer: docs/geffect_rmu.png (Figure 12);
- NPO (beta 0.5) with --reg gd / kl / rr: docs/geffect_reg.png (Figure 8, the paper's objective there).

The point-wise NPO runs took 85-108 s each (a backward per sample), the others 18-65 s, one thread on busy cores.

The objective-only runs (NPO, RMU) use --reg none, as the paper's Sections 4.2-4.3 study the
objectives alone; the method scripts' default is KL. Runs go to out/figures/paper/<name>.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import figures  # noqa: E402

RUNS_DIR = ROOT / "out" / "figures" / "paper"
COMMON = ["--split", "forget05", "--no-eval", "--no-save", "--geffect-every", "1", "--log-every", "1", "--overwrite"]
BETAS = ("0.5", "1", "2")
LAYERS = ("2", "4", "6")
CS = ("0", "1", "5")


def runs() -> dict:
    """{name: the method script's command line}."""
    out = {}
    for b in BETAS:
        out[f"npo-beta{b}"] = ["npo.py", "--beta", b, "--reg", "none", "--geffect-pointwise"]
    for layer in LAYERS:
        for c in CS:
            out[f"rmu-layer{layer}-c{c}"] = ["rmu.py", "--layer", layer, "--c", c, "--reg", "none"]
    for reg in ("gd", "kl", "rr"):
        out[f"npo-{reg}"] = ["npo.py", "--reg", reg]
    return out


def shrink(path):
    """The PNG in 256 colours (Pillow, which matplotlib needs anyway): a third of the size, the same to the eye."""
    import os
    from PIL import Image
    tmp = f"{path}.tmp.png"
    Image.open(path).convert("RGB").quantize(256).save(tmp, optimize=True)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draw-only", action="store_true", help="draw from the runs already in out/figures/paper/")
    args = parser.parse_args()
    start = time.time()
    if not args.draw_only:
        for name, cmd in runs().items():
            t = time.time()
            subprocess.run([sys.executable, *cmd, *COMMON, "--out", str(RUNS_DIR / name)], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
            print(f"{name}: {time.time() - t:.0f} s", flush=True)
    docs = ROOT / "docs"
    npo = [RUNS_DIR / f"npo-beta{b}" for b in BETAS]
    made = [
        figures.panels(npo, docs / "geffect_npo_beta.png", cols_key="beta", symlog=True),
        figures.pointwise(npo, docs / "geffect_npo_pointwise.png", steps=(5, 10, 15), symlog=True),
        figures.pointwise([RUNS_DIR / "npo-beta1"], docs / "geffect_npo_pointwise_steps.png", steps=(5, 10, 15),
                          separate=True, symlog=True),
        figures.panels([RUNS_DIR / f"rmu-layer{layer}-c{c}" for layer in LAYERS for c in CS], docs / "geffect_rmu.png",
                       rows_key="layer", cols_key="c", symlog=True),
        figures.panels([RUNS_DIR / f"npo-{r}" for r in ("gd", "kl", "rr")], docs / "geffect_reg.png", cols_key="reg",
                       symlog=True),
    ]
    for path in made:
        shrink(path)
        print(f"{path} ({Path(path).stat().st_size / 1024:.0f} KB)")
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
