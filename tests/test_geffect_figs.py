"""The paper's other G-effect figures (`geffect.py panels` and `pointwise`), drawn from hand-written run folders."""
import json
import math

import numpy as np
import pytest

import common
import geffect
from conftest import run_main

BETA1_W = [0.0, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0, 1.3, 1.9]  # groups 0 0 0 1 2 3 4 4 5 5


def fake_run(folder, args, steps=20, pointwise="w", log=True):
    """A run folder: geffect.jsonl with a row per step (pointwise "w": ten samples with BETA1_W as
    weights and spread PG-effects; "no-w": without w_npo; None: no point-wise values), log.jsonl, args.json."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(str(folder)))
    risk = lambda s, sign: dict(total=sign * s, layers=[], **{g: sign * s / 5 for g in geffect.GROUPS})
    with open(folder / "geffect.jsonl", "w") as f:
        for s in range(1, steps + 1):
            row = dict(step=s, unlearn=risk(s, -1), retain=risk(s, 1))
            if pointwise:
                row["pointwise"] = [dict(pg_unlearn=-s * float(rng.uniform(1, 3)), pg_retain=float(rng.normal()),
                                         logp=-1.0, ref_logp=-1.0, **({"w_npo": w} if pointwise == "w" else {}))
                                    for w in BETA1_W]
            f.write(json.dumps(row) + "\n")
    if log:
        with open(folder / "log.jsonl", "w") as f:
            for s in range(1, steps + 1):
                f.write(json.dumps(dict(step=s, weight=1 / s, forget_nll=0.1 * s)) + "\n")
    if args is not None:
        (folder / "args.json").write_text(json.dumps(dict(args, out=str(folder), command=f"npo.py --out {folder}",
                                                          torch="x")))
    return str(folder)


NPO = dict(model="tiny", split="forget05", lr=0.001, reg="none", beta=0.5)


@pytest.mark.parametrize("w,group", [(0.0, 0), (1e-30, 0), (0.2, 0), (0.2000001, 1), (0.4, 1), (0.5, 2), (0.6, 2),
                                     (0.79, 3), (0.8, 3), (0.81, 4), (1.0, 4), (1.0000001, 5), (1.99, 5)])
def test_weight_group_puts_known_weights_in_the_papers_groups(w, group):
    """Groups (lo, hi] as the paper's Figure 16, w_npo = 1 (every sample at theta_o) in the top one, above 1 its own."""
    assert geffect.weight_group(w) == group
    assert geffect.W_LABELS[group] == ["(0.0, 0.2]", "(0.2, 0.4]", "(0.4, 0.6]", "(0.6, 0.8]", "(0.8, 1.0]",
                                       "> 1.0"][group]


@pytest.mark.parametrize("w", [-0.1, float("nan")])
def test_weight_group_refuses_what_is_no_weight(w):
    with pytest.raises(ValueError):
        geffect.weight_group(w)


def test_kde_is_a_density_and_levels_enclose_their_mass():
    """The numpy KDE integrates to 1 and peaks at the points' centre; on a standard normal's grid the
    50 % level is the closed form exp(-r^2/2)/(2 pi) at r^2 = -2 ln 0.5; points on a line give None."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(3, 1, 200), rng.normal(-2, 0.5, 200)
    gx, gy = np.linspace(-3, 9, 241), np.linspace(-6, 2, 161)
    z = geffect.kde_grid(x, y, gx, gy)
    assert z.shape == (161, 241)
    assert abs(z.sum() * (gx[1] - gx[0]) * (gy[1] - gy[0]) - 1) < 0.01
    # at one grid point, the mean of the 200 kernels N(p_k, H), H = cov * n^(-1/3) (Scott, 2 dimensions)
    h = np.cov(np.stack([x, y])) * 200 ** (-1 / 3)
    d = np.stack([x - gx[120], y - gy[100]], 1)
    by_hand = np.mean(np.exp(-0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(h), d))) / (2 * math.pi * math.sqrt(np.linalg.det(h)))
    assert z[100, 120] == pytest.approx(by_hand, rel=1e-9)
    assert geffect.kde_grid(x, 2 * x + 1, gx, gy) is None and geffect.kde_grid(x[:4], y[:4], gx, gy) is None
    g = np.linspace(-6, 6, 401)
    gx, gy = np.meshgrid(g, g)
    normal = np.exp(-(gx ** 2 + gy ** 2) / 2) / (2 * math.pi)
    lo, hi = geffect.mass_levels(normal, (0.9, 0.5))
    assert hi == pytest.approx(0.5 / (2 * math.pi), rel=0.02) and lo == pytest.approx(0.1 / (2 * math.pi), rel=0.02)


def test_pointwise_figure_groups_panels_and_counts(tmp_path):
    """Joined: one panel per run titled by its beta, each group's count in the legend (the w > 1 samples
    too, 2 per checkpoint); separate: a row per run, a panel per step."""
    runs = [fake_run(tmp_path / f"npo-{b}", dict(NPO, beta=b)) for b in (0.5, 2.0)]
    fig = geffect.pointwise_figure(runs, steps=(5, 10, 15))
    axes = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in axes] == ["β = 0.5, steps 5, 10, 15", "β = 2, steps 5, 10, 15"]
    labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert labels == ["w_npo (0.0, 0.2]: 9", "w_npo (0.2, 0.4]: 3", "w_npo (0.4, 0.6]: 3", "w_npo (0.6, 0.8]: 3",
                      "w_npo (0.8, 1.0]: 6", "w_npo > 1.0 (outside the paper's groups): 6"]
    assert axes[0].get_xlabel() == "unlearning PG-effect (D_u)" and axes[0].get_ylabel() == "retaining PG-effect (D_r)"
    # a scatter per group, a contour set for each group with 5 points or more (9, 6 and 6 here)
    assert len(axes[0].collections) == 6 + 3
    fig = geffect.pointwise_figure(runs, steps=(5, 10, 15), separate=True, symlog=True)
    axes = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in axes] == [f"β = {b}, step {s}" for b in ("0.5", "2") for s in (5, 10, 15)]
    rows = sorted({round(ax.get_position().y0, 3) for ax in axes})
    assert len(rows) == 2 and round(axes[0].get_position().y0, 3) == rows[1]  # beta 0.5 on top
    assert axes[0].get_xscale() == "symlog"


def test_pointwise_cli_writes_the_figure(tmp_path):
    run = fake_run(tmp_path / "npo", NPO)
    out = tmp_path / "figs" / "pw.png"
    out.parent.mkdir()
    r = run_main("geffect.py", "pointwise", run, "--steps", "5", "15", "--separate", "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["pw.png"]  # no temporary file left


@pytest.mark.parametrize("case,message", [
    ("no-pointwise", "no point-wise rows: run it with --geffect-pointwise"),
    ("no-w", "have no w_npo"),
    ("short", "no point-wise row at step 15 (it has steps 1-12)"),
    ("no-args", "args.json does not exist"),
    ("no-run", "geffect.jsonl does not exist"),
    ("bad-step", "--steps are steps of log.jsonl, from 1; got 0"),
    ("no-folder", "the folder"),
    ("bad-type", "must end in an image type"),
])
def test_pointwise_bad_input_one_line_exit_2_nothing_written(case, message, tmp_path):
    good = fake_run(tmp_path / "good", NPO)
    run = dict(
        **{"no-pointwise": fake_run(tmp_path / "a", NPO, pointwise=None), "no-w": fake_run(tmp_path / "b", NPO, pointwise="no-w"),
           "short": fake_run(tmp_path / "c", NPO, steps=12), "no-args": fake_run(tmp_path / "d", None),
           "no-run": str(tmp_path / "nowhere")}).get(case, good)
    out = {"no-folder": tmp_path / "nofolder" / "x.png", "bad-type": tmp_path / "x.pgn"}.get(case, tmp_path / "x.png")
    steps = ["0", "5"] if case == "bad-step" else ["5", "10", "15"]
    r = run_main("geffect.py", "pointwise", good, run, "--steps", *steps, "-o", out)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not list(tmp_path.rglob("*.p*g")) and not out.exists()


RMU = dict(model="tiny", split="forget05", lr=0.001, reg="kl", rr_layer=3)


def test_panel_layout_titles_and_grid():
    """Titles name the flags that differ (the grid's keys first), values sorted as numbers (10 after 2);
    bookkeeping (out, command, torch) and flags only some runs have stay out of the titles."""
    args, names = [], []
    for layer in (10, 2, 4):
        for c in (5.0, 0.0, 1.0):
            args.append(dict(RMU, layer=layer, c=c, out=f"o{layer}{c}", command=f"rmu.py {layer} {c}", method="rmu"))
            names.append(f"rmu-{layer}-{c}")
    args[0]["lora_r"] = 8  # only one run has it (another version)
    layout = geffect.panel_layout(args, names, rows_key="layer", cols_key="c")
    assert layout[0] == ("layer 10, c 5", (2, 2))
    assert layout[4] == ("layer 2, c 0", (0, 0))
    assert sorted(cell for _, cell in layout) == [(r, c) for r in range(3) for c in range(3)]
    # no keys: one row in the order given; a flag with the same value in every run is left out
    npo = [dict(NPO, beta=b, method="npo") for b in (2.0, 0.5, 1.0)]
    assert geffect.panel_layout(npo, ["a", "b", "c"]) == [("beta 2", (0, 0)), ("beta 0.5", (0, 1)), ("beta 1", (0, 2))]
    assert geffect.panel_layout(npo, ["a", "b", "c"], cols_key="beta") == [
        ("beta 2", (0, 2)), ("beta 0.5", (0, 0)), ("beta 1", (0, 1))]
    regs = [dict(NPO, reg=r, rr_layer=3) for r in ("gd", "kl", "rr")]
    assert [t for t, _ in geffect.panel_layout(regs, list("abc"), rows_key="reg")] == ["reg gd", "reg kl", "reg rr"]
    assert geffect.panel_layout([NPO], ["npo-run"]) == [("npo-run", (0, 0))]  # nothing differs: the folder's name


def test_panel_layout_refuses_a_missing_key_and_a_shared_cell():
    runs = [dict(RMU, layer=3, c=c) for c in (0.0, 1.0)]
    with pytest.raises(common.UsageError, match="b: its args.json has no 'beta'"):
        geffect.panel_layout([dict(NPO), dict(RMU, layer=3)], ["a", "b"], rows_key="beta")
    with pytest.raises(common.UsageError, match="a and b fall in the same cell"):
        geffect.panel_layout(runs, ["a", "b"], rows_key="layer")
    assert geffect.panel_layout(runs, ["a", "b"], rows_key="layer", cols_key="c")[1][1] == (0, 1)


def test_panels_cli_draws_the_grid(tmp_path, monkeypatch):
    """3 x 2 runs with --rows layer --cols c: a G-effect axis, a weight axis and its risk twin per cell,
    each G-effect panel in its row and column; one shared legend."""
    from matplotlib.figure import Figure
    saved, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), savefig(fig, *a, **k))[1])
    runs = [fake_run(tmp_path / f"rmu-{l}-{c}", dict(RMU, layer=l, c=c)) for l in (1, 6, 3) for c in (5.0, 0.0)]
    out = tmp_path / "p.png"
    r = run_main("geffect.py", "panels", *runs, "--rows", "layer", "--cols", "c", "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
    fig = saved[-1]
    assert len(fig.axes) == 18 and len(fig.legends) == 1
    top = {ax.get_title(): ax.get_position() for ax in fig.axes if ax.get_title()}
    assert sorted(top) == sorted(f"layer {l}, c {c}" for l in (1, 3, 6) for c in (0, 5))
    assert top["layer 1, c 0"].y0 > top["layer 3, c 0"].y0 > top["layer 6, c 0"].y0  # rows by layer
    assert top["layer 3, c 0"].x0 < top["layer 3, c 5"].x0  # columns by c
    assert top["layer 3, c 0"].y0 == pytest.approx(top["layer 3, c 5"].y0)


@pytest.mark.parametrize("case,message", [
    ("no-args", "args.json does not exist"),
    ("no-key", "its args.json has no 'beta'"),
    ("same-cell", "fall in the same cell"),
    ("bad-dpi", "--dpi must be positive"),
])
def test_panels_bad_input_one_line_exit_2_nothing_written(case, message, tmp_path):
    a = fake_run(tmp_path / "a", dict(RMU, layer=3, c=0.0))
    b = fake_run(tmp_path / "b", None if case == "no-args" else dict(RMU, layer=3, c=1.0))
    flags = dict(**{"no-key": ["--rows", "beta"], "same-cell": ["--rows", "layer"], "bad-dpi": ["--dpi", "0"]}).get(case, [])
    out = tmp_path / "p.png"
    r = run_main("geffect.py", "panels", a, b, *flags, "-o", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not list(tmp_path.rglob("*.png"))
