"""figures.py: the G-effect curves, `panels` and `pointwise` drawn from hand-written run folders; every subcommand's
file from a small logged run; bad input in one line."""
import json
import math

import numpy as np
import pytest

import common
import figures
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


def saving(monkeypatch):
    """(figure, renderer) of each figure figures.py saves, drawn at the figure's own resolution just before
    it is saved and closed."""
    saved, save = [], figures._save

    def keep(fig, out, dpi):
        fig.canvas.draw()
        saved.append((fig, fig.canvas.get_renderer()))
        return save(fig, out, dpi)
    monkeypatch.setattr(figures, "_save", keep)
    return saved


@pytest.mark.parametrize("w,group", [(0.0, 0), (1e-30, 0), (0.2, 0), (0.2000001, 1), (0.4, 1), (0.5, 2), (0.6, 2),
                                     (0.79, 3), (0.8, 3), (0.81, 4), (1.0, 4), (1.0000001, 5), (1.99, 5)])
def test_weight_group_puts_known_weights_in_the_papers_groups(w, group):
    """Groups (lo, hi] as the paper's Figure 16, w_npo = 1 (every sample at theta_o) in the top one, above 1 its own."""
    assert figures.weight_group(w) == group
    assert figures.W_LABELS[group] == ["(0.0, 0.2]", "(0.2, 0.4]", "(0.4, 0.6]", "(0.6, 0.8]", "(0.8, 1.0]",
                                       "> 1.0"][group]


@pytest.mark.parametrize("w", [-0.1, float("nan")])
def test_weight_group_refuses_what_is_no_weight(w):
    with pytest.raises(ValueError):
        figures.weight_group(w)


def test_kde_is_a_density_and_levels_enclose_their_mass():
    """The numpy KDE integrates to 1 and peaks at the points' centre; on a standard normal's grid the
    50 % level is the closed form exp(-r^2/2)/(2 pi) at r^2 = -2 ln 0.5; points on a line give None."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(3, 1, 200), rng.normal(-2, 0.5, 200)
    gx, gy = np.linspace(-3, 9, 241), np.linspace(-6, 2, 161)
    z = figures.kde_grid(x, y, gx, gy)
    assert z.shape == (161, 241)
    assert abs(z.sum() * (gx[1] - gx[0]) * (gy[1] - gy[0]) - 1) < 0.01
    # at one grid point, the mean of the 200 kernels N(p_k, H), H = cov * n^(-1/3) (Scott, 2 dimensions)
    h = np.cov(np.stack([x, y])) * 200 ** (-1 / 3)
    d = np.stack([x - gx[120], y - gy[100]], 1)
    by_hand = np.mean(np.exp(-0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(h), d))) / (2 * math.pi * math.sqrt(np.linalg.det(h)))
    assert z[100, 120] == pytest.approx(by_hand, rel=1e-9)
    assert figures.kde_grid(x, 2 * x + 1, gx, gy) is None and figures.kde_grid(x[:4], y[:4], gx, gy) is None
    g = np.linspace(-6, 6, 401)
    gx, gy = np.meshgrid(g, g)
    normal = np.exp(-(gx ** 2 + gy ** 2) / 2) / (2 * math.pi)
    lo, hi = figures.mass_levels(normal, (0.9, 0.5))
    assert hi == pytest.approx(0.5 / (2 * math.pi), rel=0.02) and lo == pytest.approx(0.1 / (2 * math.pi), rel=0.02)


def test_pointwise_figure_groups_panels_and_counts(tmp_path):
    """Joined: one panel per run titled by its beta, each group's count in the legend (the w > 1 samples
    too, 2 per checkpoint); separate: a row per run, a panel per step."""
    runs = [fake_run(tmp_path / f"npo-{b}", dict(NPO, beta=b)) for b in (0.5, 2.0)]
    fig = figures.pointwise_figure(runs, steps=(5, 10, 15))
    axes = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in axes] == ["β = 0.5, steps 5, 10, 15", "β = 2, steps 5, 10, 15"]
    labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert labels == ["w_npo (0.0, 0.2]: 9", "w_npo (0.2, 0.4]: 3", "w_npo (0.4, 0.6]: 3", "w_npo (0.6, 0.8]: 3",
                      "w_npo (0.8, 1.0]: 6", "w_npo > 1.0 (outside the paper's groups): 6"]
    assert axes[0].get_xlabel() == "unlearning PG-effect (D_u)" and axes[0].get_ylabel() == "retaining PG-effect (D_r)"
    # a scatter per group, a contour set for each group with 5 points or more (9, 6 and 6 here)
    assert len(axes[0].collections) == 6 + 3
    fig = figures.pointwise_figure(runs, steps=(5, 10, 15), separate=True, symlog=True)
    axes = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in axes] == [f"β = {b}, step {s}" for b in ("0.5", "2") for s in (5, 10, 15)]
    rows = sorted({round(ax.get_position().y0, 3) for ax in axes})
    assert len(rows) == 2 and round(axes[0].get_position().y0, 3) == rows[1]  # beta 0.5 on top
    assert axes[0].get_xscale() == "symlog"


def test_pointwise_cli_writes_the_figure(tmp_path):
    run = fake_run(tmp_path / "npo", NPO)
    out = tmp_path / "figs" / "pw.png"
    out.parent.mkdir()
    r = run_main("figures.py", "pointwise", run, "--steps", "5", "15", "--separate", "-o", out)
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
    r = run_main("figures.py", "pointwise", good, run, "--steps", *steps, "-o", out)
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
    layout = figures.panel_layout(args, names, rows_key="layer", cols_key="c")
    assert layout[0] == ("layer 10, c 5", (2, 2))
    assert layout[4] == ("layer 2, c 0", (0, 0))
    assert sorted(cell for _, cell in layout) == [(r, c) for r in range(3) for c in range(3)]
    # no keys: one row in the order given; a flag with the same value in every run is left out
    npo = [dict(NPO, beta=b, method="npo") for b in (2.0, 0.5, 1.0)]
    assert figures.panel_layout(npo, ["a", "b", "c"]) == [("beta 2", (0, 0)), ("beta 0.5", (0, 1)), ("beta 1", (0, 2))]
    assert figures.panel_layout(npo, ["a", "b", "c"], cols_key="beta") == [
        ("beta 2", (0, 2)), ("beta 0.5", (0, 0)), ("beta 1", (0, 1))]
    regs = [dict(NPO, reg=r, rr_layer=3) for r in ("gd", "kl", "rr")]
    assert [t for t, _ in figures.panel_layout(regs, list("abc"), rows_key="reg")] == ["reg gd", "reg kl", "reg rr"]
    assert figures.panel_layout([NPO], ["npo-run"]) == [("npo-run", (0, 0))]  # nothing differs: the folder's name


def test_panel_layout_refuses_a_missing_key_and_a_shared_cell():
    runs = [dict(RMU, layer=3, c=c) for c in (0.0, 1.0)]
    with pytest.raises(common.UsageError, match="b: its args.json has no 'beta'"):
        figures.panel_layout([dict(NPO), dict(RMU, layer=3)], ["a", "b"], rows_key="beta")
    with pytest.raises(common.UsageError, match="a and b fall in the same cell"):
        figures.panel_layout(runs, ["a", "b"], rows_key="layer")
    assert figures.panel_layout(runs, ["a", "b"], rows_key="layer", cols_key="c")[1][1] == (0, 1)


def test_panels_cli_draws_the_grid(tmp_path, monkeypatch):
    """3 x 2 runs with --rows layer --cols c: a G-effect axis, a weight axis and its risk twin per cell,
    each G-effect panel in its row and column; one shared legend."""
    saved = saving(monkeypatch)
    runs = [fake_run(tmp_path / f"rmu-{l}-{c}", dict(RMU, layer=l, c=c)) for l in (1, 6, 3) for c in (5.0, 0.0)]
    out = tmp_path / "p.png"
    r = run_main("figures.py", "panels", *runs, "--rows", "layer", "--cols", "c", "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
    fig, _ = saved[-1]
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
    r = run_main("figures.py", "panels", a, b, *flags, "-o", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not list(tmp_path.rglob("*.png"))


# ---- the G-effect curves (`geffect`, Figure 3's layout)

def wga_run(folder, steps=6):
    """A run folder with a geffect.jsonl and a log.jsonl of WGA's fields, values of both signs."""
    folder.mkdir(parents=True)
    risk = lambda s, sign: dict(total=sign * 10.0 ** -s, layers=[], **{g: sign * 10.0 ** -(s + 1) for g in geffect.GROUPS})
    with open(folder / "geffect.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps(dict(step=s, unlearn=risk(s, -1), retain=risk(s, 1))) + "\n")
    with open(folder / "log.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps(dict(step=s, weight=0.5 / s, forget_nll=0.1 * s)) + "\n")
    return str(folder)


@pytest.mark.parametrize("n_runs", range(1, 9))
def test_geffect_legend_fits_the_canvas(n_runs, tmp_path, monkeypatch):
    """The saved figure holds the whole legend, every entry (unlearn, the total, first), and the legend
    covers no panel, for 1 to 8 runs: the README's one-run command once drew a legend wider than the figure."""
    saved = saving(monkeypatch)
    runs = [wga_run(tmp_path / f"wga-geffect-{i}") for i in range(n_runs)]
    out = figures.geffect(runs, tmp_path / "g.png", symlog=True)
    assert str(out) == str(tmp_path / "g.png") and (tmp_path / "g.png").stat().st_size > 0
    fig, renderer = saved[-1]
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[0] == "unlearn" and "retain lm" in labels and len(labels) == 12
    canvas, box = fig.bbox, legend.get_window_extent(renderer)
    assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1 and canvas.y0 <= box.y0 and box.y1 <= canvas.y1, (box, canvas)
    for ax in fig.axes:
        if ax.axison:
            assert not box.overlaps(ax.get_tightbbox(renderer)), (box, ax.get_tightbbox(renderer))


@pytest.mark.parametrize("key,log_scale", [("weight", False), ("inv_conf", True), ("target_p", False), (None, False)])
def test_draw_panel_puts_the_logged_weight_under_the_curves(key, log_scale):
    """The weight a method logs (NPO's weight, GA's inv_conf, UNDIAL's target_p) is drawn under the G-effect as
    logged; a log without one (PO, RMU) leaves that axis without ticks."""
    import matplotlib.pyplot as plt
    rows = [dict(step=s, unlearn=dict(total=-s, **{g: -s / 5 for g in geffect.GROUPS}),
                 retain=dict(total=s, **{g: s / 5 for g in geffect.GROUPS})) for s in (1, 2, 3)]
    log = [dict(step=s, forget_nll=0.1 * s, **({key: 0.25 * s} if key else {})) for s in (1, 2, 3)]
    fig, (ax, ax2) = plt.subplots(2)
    figures.draw_panel(ax, ax2, rows, log, "run")
    if key:
        (line,) = ax2.get_lines()
        assert list(line.get_ydata()) == [0.25, 0.5, 0.75] and ax2.get_ylabel() == key
        assert ax2.get_yscale() == ("log" if log_scale else "linear")
    else:
        assert ax2.get_lines() == [] and list(ax2.get_yticks()) == []
    plt.close(fig)


def test_geffect_bare_name_goes_under_out(tmp_path, monkeypatch):
    """`-o NAME.png` without a folder writes out/NAME.png, never into the repository root; a path is kept."""
    monkeypatch.setattr(common, "OUT", tmp_path / "out")
    run = wga_run(tmp_path / "run")
    assert figures.main(["geffect", run, "-o", "fig.png"]) == str(tmp_path / "out" / "fig.png")
    assert (tmp_path / "out" / "fig.png").is_file() and not (common.ROOT / "fig.png").exists()
    assert figures.main(["geffect", run, "-o", str(tmp_path / "here.png")]) == str(tmp_path / "here.png")


# ---- every subcommand from a small logged run; bad input

@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_path):
    """2 WGA steps on forget01 with the G-effect at every step (and its "delta", --geffect-order 1) and the token
    weights logged: what a method script writes."""
    out = tmp_path_factory.mktemp("figs") / "wga"
    r = run_main("wga.py", "--split", "forget01", "--reg", "kl", "--max-steps", 2, "--geffect-every", 1,
                 "--log-token-weights", "--log-every", 1, "--no-eval", "--no-save", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def sweep_folder(folder):
    """A sweep folder's sweep.json, hand-written: GA (no grid), NPO over beta, RMU over c at hidden state 2."""
    folder.mkdir()
    es = lambda u: dict(es_exact_retain=0.9, es_exact_unlearn=u, es_perturb_retain=0.8, es_perturb_unlearn=u / 2)
    row = lambda method, params, u: dict(method=method, split="forget01", params=params, lam=0.5, **es(u))
    rows = [row("ga", {}, 0.3), row("npo", {"beta": 1.0}, 0.2), row("npo", {"beta": 0.5}, 0.4),
            row("rmu", {"layer": 2, "c": 0.0}, 0.5), row("rmu", {"layer": 2, "c": 1.0}, 0.1)]
    (folder / "sweep.json").write_text(json.dumps(dict(settings={}, rmu_layers=dict(shallow=1, middle=2, deep=4),
                                                       before=dict(forget01=es(0.95)), rows=rows, best={})))
    return folder


def test_every_subcommand_writes_its_file(logged_run, tmp_path, monkeypatch):
    """geffect, panels, delta and tokens from a method script's run folder, pointwise from an NPO-like one,
    tuning from a sweep.json: each prints the path it wrote, a PNG (and the page), no temporary file left."""
    npo = fake_run(tmp_path / "runs" / "npo", NPO)
    sweep = sweep_folder(tmp_path / "sweep")
    figs = tmp_path / "figs"
    figs.mkdir()
    made = {}
    for cmd, args in [("geffect", [logged_run, "--symlog"]), ("panels", [logged_run, npo]),
                      ("pointwise", [npo, "--steps", 5, 10]), ("delta", [logged_run])]:
        r = run_main("figures.py", cmd, *args, "-o", figs / f"{cmd}.png")
        assert r.returncode == 0, (cmd, r.stderr)
        made[cmd] = r.stdout.strip()
    r = run_main("figures.py", "tokens", logged_run, "--rows", 0, 1, "-o", figs / "tokens.html")
    assert r.returncode == 0, r.stderr
    made["tokens"] = r.stdout.strip()
    assert made == {cmd: str(figs / f"{cmd}.{'html' if cmd == 'tokens' else 'png'}") for cmd in made}
    assert "Forget row 1" in (figs / "tokens.html").read_text()
    assert sorted(p.name for p in figs.iterdir()) == ["delta.png", "geffect.png", "panels.png", "pointwise.png",
                                                      "tokens.html", "tokens.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in figs.glob("*.png"))
    saved = saving(monkeypatch)
    r = run_main("figures.py", "tuning", sweep)  # into the sweep folder, as sweep.py writes them
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(sweep / "tuning-npo.png"), str(sweep / "tuning-rmu-layer2.png")]
    assert [f.get_suptitle() for f, _ in saved] == ["NPO", "RMU (hidden state 2, middle)"]
    assert sorted(p.name for p in sweep.iterdir()) == ["sweep.json", "tuning-npo.png", "tuning-rmu-layer2.png"]
    r = run_main("figures.py", "tuning", sweep, "rmu-layer2", "-o", figs)  # one asked for, elsewhere
    assert r.returncode == 0 and r.stdout.split() == [str(figs / "tuning-rmu-layer2.png")], r.stderr


def test_tuning_tables_group_and_sort_a_sweeps_rows(tmp_path):
    """One table per method (RMU: per hidden state, named shallow/middle/deep where it is one), rows sorted by
    the swept value; GA and PO have no grid and no table."""
    sweep = json.loads((sweep_folder(tmp_path / "sweep") / "sweep.json").read_text())
    tables = figures.tuning_tables(sweep["rows"], sweep["rmu_layers"])
    assert [(t, p, m, f) for t, p, m, f, _ in tables] == [("NPO", "beta", "npo", {}),
                                                         ("RMU (hidden state 2, middle)", "c", "rmu", {"layer": 2})]
    assert [r["params"]["beta"] for r in tables[0][4]["forget01"]] == [0.5, 1.0]
    assert figures.tuning_tables(sweep["rows"], {})[1][0] == "RMU (hidden state 2)"
    assert [figures.tuning_name(m, f) for _, _, m, f, _ in tables] == ["tuning-npo", "tuning-rmu-layer2"]
    assert figures.tuning_name("wtnpo", {"alpha": 0.5}) == "tuning-wtnpo-alpha0.5"


def test_delta_lays_out_methods_by_reg(logged_run, tmp_path, monkeypatch):
    """A column per method in the order given, a row per --reg (sorted), a cell without a run left blank;
    each panel the three lines of both risks, on the logged steps."""
    import shutil
    runs = []
    for name, command, reg in (("wga-kl", "wga.py", "kl"), ("wga-none", "wga.py", "none"), ("npo-kl", "npo.py", "kl")):
        shutil.copytree(logged_run, tmp_path / name)
        args = json.loads((tmp_path / name / "args.json").read_text())
        (tmp_path / name / "args.json").write_text(json.dumps(dict(args, command=command, reg=reg)))
        runs.append(tmp_path / name)
    saved = saving(monkeypatch)
    assert figures.delta(runs, tmp_path / "d.png") == str(tmp_path / "d.png")
    axes = saved[-1][0].axes
    assert [ax.get_title() for ax in axes] == ["WGA, kl", "NPO, kl", "WGA, none", ""]
    assert [ax.axison for ax in axes] == [True, True, True, False]
    assert [ax.get_ylabel() for ax in axes[:3]] == ["change of R", "", "change of R"]
    rows = [json.loads(line) for line in open(logged_run / "geffect.jsonl")]
    lines = axes[0].get_lines()
    assert len(lines) == 7  # actual, -lr e, update for D_u and D_r, and the zero line
    assert list(lines[0].get_xdata()) == [1, 2] and list(lines[0].get_ydata()) == [r["delta"]["unlearn"]["actual"]
                                                                                   for r in rows]
    assert list(lines[4].get_ydata()) == [r["delta"]["retain"]["gradient"] for r in rows]
    with pytest.raises(common.UsageError, match="are both WGA with --reg kl"):
        figures.delta([runs[0], runs[0]], tmp_path / "d2.png")


@pytest.mark.parametrize("argv, says", [
    (["geffect", "{nowhere}"], "nowhere/geffect.jsonl does not exist"),
    (["panels", "{run}", "{nowhere}"], "nowhere/geffect.jsonl does not exist"),
    (["pointwise", "{nowhere}"], "nowhere/geffect.jsonl does not exist"),
    (["delta", "{nowhere}"], "nowhere/geffect.jsonl does not exist"),
    (["delta", "{run}"], "its geffect.jsonl rows have no delta (run it with --geffect-order 1 or 2)"),
    (["tokens", "{nowhere}"], "nowhere/token_weights.jsonl does not exist"),
    (["tuning", "{nowhere}"], "nowhere/sweep.json does not exist"),
    (["tuning", "{sweep}", "wga"], "has no tuning table tuning-wga (it has tuning-npo, tuning-rmu-layer2)"),
    (["geffect", "{run}", "--dpi", "0"], "--dpi must be positive"),
    (["draw", "{run}"], "invalid choice: 'draw'"),
    ([], "the following arguments are required: cmd"),
])
def test_bad_input_one_line_exit_2_nothing_written(argv, says, tmp_path):
    run = wga_run(tmp_path / "run")
    sweep = sweep_folder(tmp_path / "sweep")
    argv = [a.format(nowhere=tmp_path / "nowhere", run=run, sweep=sweep) for a in argv]
    if argv and argv[0] in ("geffect", "panels", "pointwise", "delta", "tokens"):
        argv += ["-o", str(tmp_path / ("x.html" if argv[0] == "tokens" else "x.png"))]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = run_main("figures.py", *argv)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("figures.py: error: ") and says in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ---- relearn: attack.py's relearning attack

def attack_json(path, control=True, relearn=True):
    """An attack.json, hand-written: the unlearned model relearnt for S = 2 and 5, its control, one quantization."""
    v = lambda es, **more: dict(es_exact_v=es, es_perturb_v=es / 2, es_exact_retain=0.9, auc_min_k_pp_v=0.6, **more)
    attacks = [dict(attack="relearn", on="other-authors", steps=S, **v(es), control_es_exact_v=c if control else None,
                    recovery=(es - 0.1) / 0.9) for S, es, c in ((5, 0.4, 0.2), (2, 0.3, 0.15))] if relearn else []
    attacks.append(dict(attack="quantize", bits=4, es_exact_unlearn=0.2, es_perturb_unlearn=0.1, es_exact_retain=0.9,
                        control_es_exact_unlearn=1.0))
    before = dict(unlearned=v(0.1), original=v(1.0), retain_only=v(0.12) if control else None)
    path.write_text(json.dumps(dict(model=str(path.parent / "wga-run"), before=before, attacks=attacks)))
    return path


def test_relearn_draws_es_on_v_against_S_with_the_control_dashed(tmp_path, monkeypatch):
    """One colour per attack.json: the unlearned model solid from S = 0 (before relearning), sorted by S; the
    control dashed from the retain-only model before relearning; the original's level dotted. An attack.json
    without a control draws no dashed line."""
    saved = saving(monkeypatch)
    a, b = attack_json(tmp_path / "a.json"), attack_json(tmp_path / "b.json", control=False)
    r = run_main("figures.py", "relearn", a, b, "-o", tmp_path / "r.png")
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "r.png"), r.stderr
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = saved[-1][0].axes
    lines = [(l.get_linestyle(), l.get_color(), list(l.get_xdata()), list(l.get_ydata())) for l in ax.get_lines()]
    assert [(s, c) for s, c, _, _ in lines] == [("-", "C0"), ("--", "C0"), (":", "C0"), ("-", "C1"), (":", "C1")]
    assert lines[0][2:] == ([0, 2, 5], [0.1, 0.3, 0.4]) and lines[1][2:] == ([0, 2, 5], [0.12, 0.15, 0.2])
    assert lines[2][3] == [1.0, 1.0] and ax.get_ylabel() == "ES-exact on V"
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["wga-run (other-authors)",
                                                                      "wga-run (other-authors): control (retain-only)"]


@pytest.mark.parametrize("content, says", [
    (None, "x.json does not exist: give an attack.json that attack.py wrote"),
    ("[]", "needs before and attacks: is it attack.py's attack.json?"),
    ("quantized only", "holds no relearning attack (attack.py ran with --relearn-steps none)"),
])
def test_relearn_bad_input_one_line_exit_2_nothing_written(content, says, tmp_path):
    path = tmp_path / "x.json"
    if content == "quantized only":
        attack_json(path, relearn=False)
    elif content is not None:
        path.write_text(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_main("figures.py", "relearn", path, "-o", tmp_path / "r.png")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and says in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_table1_relearn_draws_each_picks_mean_over_its_seeds_and_the_control(tmp_path, monkeypatch):
    """sweep.py --attacks' figure: per split a panel, per pick the mean ES on V over its seeds at S = 0 and each S
    (hand-computed here), the model before unlearning dotted, the control dashed black."""
    import sweep
    saved = saving(monkeypatch)

    def att(method, seed, v0, v1, v2):
        return dict(method=method, split="forget05", params={}, seed=seed, privleak=-10.0 * (seed or 0), auc_min_k=0.5,
                    quant4=dict(es_exact_unlearn=0.1 * (seed or 0)), before_v=dict(es_exact_v=v0),
                    relearn=[dict(steps=2, es_exact_v=v1), dict(steps=5, es_exact_v=v2)])
    t1 = lambda m, seed: {**{k: 0.5 for k in sweep.T1_COLS}, "method": m, "split": "forget05", "params": {},
                          "seed": seed, "log10_forget_quality_bound": None, "uwc": {k: 0.5 for k in ("lam",) + sweep.COLS}}
    attacks = [att(None, None, 1.0, 1.0, 1.0), att("ga", 0, 0.1, 0.2, 0.3), att("ga", 1, 0.3, 0.4, 0.7)]
    cells = sweep.table1_cells([t1(None, None), t1("ga", 0), t1("ga", 1)], attacks)
    ga = cells[1]["attacks"]
    assert ga["es_exact_v_mean"] == pytest.approx([0.2, 0.3, 0.5]) and ga["relearn_es_exact_v"]["values"] == [0.3, 0.7]
    assert ga["privleak"]["mean"] == pytest.approx(-5.0) and ga["quant4_es_exact_unlearn"]["max"] == pytest.approx(0.1)
    control = dict(on="other-authors", before_v=dict(es_exact_v=0.05), relearn=[dict(es_exact_v=0.1),
                                                                                dict(es_exact_v=0.15)])
    (tmp_path / "t.json").write_text(json.dumps(dict(cells=cells, attacks=attacks,
                                                     attack_controls=dict(forget05=control))))
    out = figures.table1_relearn(tmp_path / "t.json", tmp_path / "f.png")
    assert out == str(tmp_path / "f.png") and (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = saved[-1][0].axes
    lines = [(l.get_linestyle(), l.get_color(), list(l.get_xdata()), list(l.get_ydata())) for l in ax.get_lines()]
    assert [(s, c) for s, c, _, _ in lines] == [(":", "grey"), ("-", "C0"), ("--", "black")]
    assert lines[1][2] == [0, 2, 5] and lines[1][3] == pytest.approx([0.2, 0.3, 0.5])
    assert lines[2][3] == [0.05, 0.1, 0.15] and ax.get_title() == "forget05 (T, V: other-authors)"
    (tmp_path / "none.json").write_text(json.dumps(dict(cells=sweep.table1_cells([t1("ga", 0)]))))
    with pytest.raises(figures.common.UsageError, match="holds no attack columns: run sweep.py with --attacks"):
        figures.table1_relearn(tmp_path / "none.json", tmp_path / "g.png")
