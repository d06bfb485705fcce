"""
Every picture the project draws, from what runs have logged (a run folder's geffect.jsonl, log.jsonl,
args.json and token_weights.jsonl; a sweep folder's sweep.json). Nothing is trained or measured here:
geffect.py measures, sweep.py tunes, this file draws.

    python figures.py geffect RUN... -o FILE.png [--symlog]          # the G-effect, Figure 3's layout
    python figures.py panels RUN... [--rows KEY] [--cols KEY] [--symlog] -o FILE.png
    python figures.py pointwise RUN... [--steps 5 10 15] [--separate] [--symlog] -o FILE.png
    python figures.py tokens RUN... [--rows 0 1] [--epochs 1 2 ...] [--scale run|shared] -o FILE.html
    python figures.py tuning SWEEP [NAME...] [-o FOLDER]
    python figures.py delta RUN... -o FILE.png
    python figures.py relearn ATTACK_JSON... -o FILE.png

- geffect: one column per run (--geffect-every runs): the unlearning and retaining G-effect per layer
  group over the steps, under them the method's weight and the forget risk from log.jsonl.
- panels: runs side by side, titled and laid out by the flags that differ (NPO over beta, RMU over
  layer x c, GD/KL/RR; the paper's Figures 4/11, 12, 8).
- pointwise: NPO's w_npo against each forget sample's PG-effect, from --geffect-pointwise runs
  (Figures 5b, 16, 17).
- tokens: the forget answers' tokens shaded by their loss weights, epoch by epoch, as a page FILE.html and
  an image FILE.png beside it, from --log-token-weights runs (Appendix F.2).
- tuning: sweep.py's tuning curves (unlearn ES after UWC against the hyper-parameter, one per tuning
  table: tuning-npo.png, tuning-rmu-layer4.png, ...): all of them, or the NAMEs given, into the sweep
  folder (or -o FOLDER).
- delta: what the real step did to each risk against the G-effect's prediction, a column per method
  and a row per --reg, from runs with --geffect-order 1 or 2 (benchmarks/geffect_delta.py).
- relearn: ES-exact on V against the relearning steps S, from attack.py's attack.json files, one colour
  each, the control (the retain-only model relearnt alike) dashed; S = 0 is the model before relearning.

-o with a bare file name writes under out/ (git-ignored), as the runs do; a path with a folder is kept.
Every file is written atomically; bad input writes nothing and says why in one line (exit status 2).
"""
import bisect
import json
import os
import textwrap
from html import escape
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.font_manager import FontProperties
from scipy.stats import gaussian_kde

import common
from geffect import GROUPS

matplotlib.use("Agg")  # files only, never a window


# -------------------------------------------------------------------- reading what runs logged; writing a figure

def read_run(run_dir) -> tuple:
    """(geffect rows, log rows) of a run folder; raises UsageError when it has no geffect.jsonl."""
    path = Path(run_dir) / "geffect.jsonl"
    if not path.is_file():
        raise common.UsageError(f"{path} does not exist: run a method script with --geffect-every N first")
    try:
        rows = [json.loads(line) for line in open(path) if line.strip()]
        log_path = Path(run_dir) / "log.jsonl"
        log = [json.loads(line) for line in open(log_path) if line.strip()] if log_path.is_file() else []
    except json.JSONDecodeError as e:
        raise common.UsageError(f"{path} is not valid JSON Lines: {e}")
    if not rows:
        raise common.UsageError(f"{path} has no rows")
    return rows, log


def read_json(path: Path, why: str):
    """The JSON in `path`; raises UsageError, with `why` it is needed, when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise common.UsageError(f"{path} does not exist: {why}")
    except json.JSONDecodeError as e:
        raise common.UsageError(f"{path} is not valid JSON: {e}")


def read_args(run_dir) -> dict:
    """A run folder's args.json (the flags it ran with), plus `method` from its command (npo.py -> npo);
    raises UsageError when there is none."""
    args = read_json(Path(run_dir) / "args.json", "the figure needs the flags of each run")
    if "command" in args:
        args = dict(method=Path(str(args["command"]).split()[0]).stem, **args)
    return args


def figure_path(out, page=False) -> str:
    """A bare file name goes under out/ (git-ignored), as run folders do; a path with a folder is kept.
    Raises UsageError for a folder that does not exist or (unless `page`: an HTML page the caller
    checked) a file type matplotlib cannot write."""
    out = str(out)
    kind = Path(out).suffix.lstrip(".").lower()
    if not page and kind not in FigureCanvasBase.get_supported_filetypes():
        raise common.UsageError(f"-o {out}: the name must end in an image type ({', '.join(sorted(FigureCanvasBase.get_supported_filetypes()))})")
    if os.path.dirname(out):
        if not os.path.isdir(os.path.dirname(out)):
            raise common.UsageError(f"-o {out}: the folder {os.path.dirname(out)} does not exist")
        return out
    common.OUT.mkdir(exist_ok=True)
    return str(common.OUT / out)


def _save(fig, out, dpi) -> str:
    """Write the figure atomically (a temporary file, then os.replace) and close it."""
    tmp = f"{out}.tmp{Path(out).suffix}"
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


# ----------------------------------------------------------------------- geffect: the G-effect curves (Figure 3)

def _legend_below(fig, handles, labels):
    """The widest legend that fits the canvas: 6 columns, else 4, else 2 (one per risk); then the
    panels leave it room at the bottom, measured rather than guessed."""
    fig.canvas.draw()
    for ncol in (6, 4, 2):
        legend = fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
        box = legend.get_window_extent(fig.canvas.get_renderer())
        if box.width <= 0.98 * fig.bbox.width or ncol == 2:
            break
        legend.remove()
    fig.tight_layout(rect=(0, (box.height + 4) / fig.bbox.height, 1, 1))


def _two_row_grid(nrows, ncols, cells):
    """A figure of nrows x ncols cells, each a G-effect axis over a weight/risk axis (height 2:1);
    returns (fig, {cell: (top, bottom)}); cells not in `cells` are left blank."""
    fig, grid = plt.subplots(2 * nrows, ncols, figsize=(4.2 * ncols, 5.2 * nrows), squeeze=False,
                             gridspec_kw=dict(height_ratios=[2, 1] * nrows))
    axes = {}
    for r in range(nrows):
        for c in range(ncols):
            if (r, c) in cells:
                axes[(r, c)] = (grid[2 * r][c], grid[2 * r + 1][c])
            else:
                grid[2 * r][c].axis("off")
                grid[2 * r + 1][c].axis("off")
    return fig, axes


def draw_panel(ax, ax2, rows, log, title, symlog=False, first_col=True):
    """One run in the paper's Figure 3 style: on `ax` the unlearning G-effect in red, retaining in
    blue, layer groups dashed (embed and lm dash-dotted); on `ax2` the method's weight (Figure 5a),
    GA's inverse confidence (Figure 9c) or UNDIAL's target probability of the answer token, and the
    forget risk (Figure 9b) from log.jsonl."""
    styles = dict(embed="-.", shallow="--", middle="--", deep="--", lm="-.")
    shades = dict(embed=0.35, shallow=0.55, middle=0.7, deep=0.85, lm=0.45)
    steps = [r["step"] for r in rows]
    for key, cmap in (("unlearn", plt.cm.Reds), ("retain", plt.cm.Blues)):
        ax.plot(steps, [r[key]["total"] for r in rows], color=cmap(0.95), lw=2, label=f"{key}")
        for g in GROUPS:
            ax.plot(steps, [r[key][g] for r in rows], styles[g], color=cmap(shades[g]), lw=1, label=f"{key} {g}")
    ax.axhline(0, color="black", lw=0.5)
    if symlog:
        ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    if first_col:
        ax.set_ylabel("G-effect")
    key = next((k for k in ("weight", "inv_conf", "target_p") if log and k in log[0]), None)
    if key:
        ax2.plot([x["step"] for x in log], [x[key] for x in log], color="tab:green", label=key)
        if key == "inv_conf":
            ax2.set_yscale("log")
        ax2.set_ylabel(key, color="tab:green")
    else:  # no weight in the log (RMU, PO): the left axis would be an empty 0-1 scale
        ax2.set_yticks([])
    if log:
        ax3 = ax2.twinx()
        ax3.plot([x["step"] for x in log], [x["forget_nll"] for x in log], color="tab:gray", label="forget NLL")
        ax3.set_ylabel("forget NLL (risk)", color="tab:gray")
    ax2.set_xlabel("step")


def geffect(run_dirs, out, symlog=False, dpi=130):
    """`geffect`: the paper's Figure 3 style, one column per run (up to 4 a row), titled by the run folder's
    name (draw_panel), one legend below. Returns the path written (figure_path)."""
    runs = [(Path(d).name, *read_run(d)) for d in run_dirs]
    out = figure_path(out)
    ncols = min(len(runs), 4)
    nrows = -(-len(runs) // ncols)
    fig, axes = _two_row_grid(nrows, ncols, {divmod(i, ncols) for i in range(len(runs))})
    for i, (name, rows, log) in enumerate(runs):
        draw_panel(*axes[divmod(i, ncols)], rows, log, name, symlog, first_col=i % ncols == 0)
    _legend_below(fig, *axes[(0, 0)][0].get_legend_handles_labels())
    return _save(fig, out, dpi)


# --------------------------------------------------------------- panels: runs side by side (Figures 4/11, 8, 12)

NOT_FLAGS = {"out", "command", "overwrite", "torch", "transformers"}  # args.json entries that name no setting


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _order(v):
    """Sort key for flag values: numbers by value, then everything else as text."""
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def panel_layout(args_list, names, rows_key=None, cols_key=None) -> list:
    """For the runs' args.json dicts: [(title, (row, col))] in the runs' order. Titles list the flags
    that every run has and whose values differ (the --rows and --cols keys first), e.g. "layer 3, c 5";
    the run folder's name where nothing differs. Rows and columns are the sorted values of the keys;
    without keys the runs fill rows of up to 4 in the order given. Raises UsageError for a key a run
    lacks or two runs in one cell."""
    keys = [k.replace("-", "_") if k else None for k in (rows_key, cols_key)]
    for k in filter(None, keys):
        for a, name in zip(args_list, names):
            if k not in a:
                raise common.UsageError(f"{name}: its args.json has no '{k}' (it has: "
                                        f"{', '.join(x for x in a if x not in NOT_FLAGS)})")
    # flags every run has (one that only some have comes from another method or version: `method` says it)
    shared = [k for k in args_list[0] if k not in NOT_FLAGS and all(k in a for a in args_list)]
    differ = [k for k in shared if len({json.dumps(a[k], sort_keys=True) for a in args_list}) > 1]
    differ = [k for k in keys if k] + [k for k in differ if k not in keys]
    titles = [textwrap.fill(", ".join(f"{k.replace('_', '-')} {_fmt(a[k])}" for k in differ), 50) or name
              for a, name in zip(args_list, names)]
    if not any(keys):
        ncols = min(len(args_list), 4)
        return [(t, divmod(i, ncols)) for i, t in enumerate(titles)]
    axis = [sorted({json.dumps(a[k]) for a in args_list}, key=lambda s: _order(json.loads(s))) if k else ["null"]
            for k in keys]
    cells, seen = [], {}
    for a, name, t in zip(args_list, names, titles):
        cell = tuple(ax.index(json.dumps(a[k])) if k else 0 for ax, k in zip(axis, keys))
        if cell in seen:
            raise common.UsageError(f"{seen[cell]} and {name} fall in the same cell ({t}): "
                                    f"choose --rows/--cols that tell them apart")
        seen[cell] = name
        cells.append((t, cell))
    return cells


def panels(run_dirs, out, rows_key=None, cols_key=None, symlog=False, dpi=110):
    """`panels`: runs side by side in a grid (Figures 4/11: NPO over beta; 12: RMU over layer x c; 8: GD vs KL
    vs RR), each drawn as `geffect` draws it and titled by the flags that differ (panel_layout)."""
    runs = [read_run(d) for d in run_dirs]
    layout = panel_layout([read_args(d) for d in run_dirs], [Path(d).name for d in run_dirs], rows_key, cols_key)
    out = figure_path(out)
    nrows, ncols = (max(cell[i] for _, cell in layout) + 1 for i in (0, 1))
    fig, axes = _two_row_grid(nrows, ncols, {cell for _, cell in layout})
    for (rows, log), (title, cell) in zip(runs, layout):
        draw_panel(*axes[cell], rows, log, title, symlog, first_col=cell[1] == 0)
    _legend_below(fig, *axes[layout[0][1]][0].get_legend_handles_labels())
    return _save(fig, out, dpi)


# ------------------------------------------------ pointwise: NPO's weight and the PG-effect (Figures 5b, 16, 17)

W_EDGES = (0.2, 0.4, 0.6, 0.8, 1.0)
W_LABELS = ("(0.0, 0.2]", "(0.2, 0.4]", "(0.4, 0.6]", "(0.6, 0.8]", "(0.8, 1.0]", "> 1.0")


def weight_group(w: float) -> int:
    """Index in W_LABELS of an NPO weight w_npo in [0, 2): the paper's five groups (lo, hi], and
    "> 1.0" for a sample now likelier than under theta_o (w_npo = 2 sigmoid(beta log p/p_o) > 1),
    which the paper's groups leave out. A w_npo of exactly 0 is float underflow of a tiny
    positive weight: first group."""
    if not w >= 0:  # also NaN
        raise ValueError(f"w_npo must be >= 0, got {w}")
    return bisect.bisect_left(W_EDGES, w)


def kde_grid(x, y, gx, gy):
    """Gaussian kernel density of the points (x, y) on the grid gx x gy (scipy's gaussian_kde: Scott's
    bandwidth, full covariance); None when the points span no area (fewer than 5, or on a line)."""
    if len(x) < 5:
        return None
    try:
        kde = gaussian_kde(np.stack([x, y]))
    except np.linalg.LinAlgError:  # a singular covariance: the points lie on a line
        return None
    grid_x, grid_y = np.meshgrid(gx, gy)
    return kde(np.stack([grid_x.ravel(), grid_y.ravel()])).reshape(grid_x.shape)


def mass_levels(density, masses=(0.9, 0.5)) -> list:
    """Density thresholds whose upper sets hold the given shares of the grid's mass (the contours
    then enclose 90 % and 50 % of the estimated distribution), ascending."""
    z = np.sort(density.ravel())[::-1]
    cum = np.cumsum(z) / z.sum()
    return sorted({float(z[min(np.searchsorted(cum, m), len(z) - 1)]) for m in masses})


def _symlog(v, t):  # the coordinates the density is estimated in with --symlog
    return np.sign(v) * np.log10(1 + np.abs(v) / t)


def _symlog_inv(u, t):
    return np.sign(u) * t * (10 ** np.abs(u) - 1)


def pointwise_points(run_dir, steps) -> dict:
    """{step: [(pg_unlearn, pg_retain, w_npo), ...]} of an NPO run made with --geffect-pointwise;
    raises UsageError when it has no point-wise rows, no w_npo, or no row at a requested step."""
    rows, _ = read_run(run_dir)
    have = {r["step"]: r["pointwise"] for r in rows if r.get("pointwise")}
    if not have:
        raise common.UsageError(f"{run_dir} has no point-wise rows: run it with --geffect-pointwise")
    if not all("w_npo" in p for ps in have.values() for p in ps):
        raise common.UsageError(f"{run_dir}: its point-wise rows have no w_npo (only NPO runs log the weight)")
    missing = [s for s in steps if s not in have]
    if missing:
        raise common.UsageError(f"{run_dir} has no point-wise row at step {', '.join(map(str, missing))} "
                                f"(it has steps {min(have)}-{max(have)})")
    out = {}
    for s in steps:
        out[s] = [(p["pg_unlearn"], p["pg_retain"], p["w_npo"]) for p in have[s]]
        bad = [w for _, _, w in out[s] if not w >= 0]
        if bad:
            raise common.UsageError(f"{run_dir}: w_npo {bad[0]} at step {s} (a weight is >= 0)")
    return out


def pointwise_figure(run_dirs, steps=(5, 10, 15), separate=False, symlog=False):
    """The figure of `pointwise` (returned, not saved): one panel per run with the checkpoints at
    `steps` joined (Figure 16), or with `separate` one per run and step (Figure 17, a row per run)."""
    runs = []
    for d in run_dirs:
        pts = pointwise_points(d, steps)
        beta = read_args(d).get("beta")
        if beta is None:
            raise common.UsageError(f"{d}/args.json has no beta")
        runs.append((_fmt(beta), pts))
    cells = []  # (title, points)
    for beta, pts in runs:
        if separate:
            cells += [(f"β = {beta}, step {s}", pts[s]) for s in steps]
        else:
            cells.append((f"β = {beta}, steps {', '.join(map(str, steps))}", [p for s in steps for p in pts[s]]))
    ncols = len(steps) if separate else min(len(cells), 4)
    nrows = -(-len(cells) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 4.0 * nrows), squeeze=False)
    for k in range(len(cells), nrows * ncols):
        grid.flat[k].axis("off")
    colors = [plt.cm.Blues(v) for v in (0.3, 0.45, 0.6, 0.78, 0.95)] + ["tab:orange"]
    for k, (title, pts) in enumerate(cells):
        ax = grid.flat[k]
        a = np.array(pts, dtype=float)  # n x 3: pg_unlearn, pg_retain, w_npo
        group = np.array([weight_group(w) for w in a[:, 2]])
        # --symlog: the density is estimated in sign(v) log10(1 + |v|/t) coordinates, t per axis
        # the 10th percentile of the nonzero |values| (matplotlib's symlog scale draws them alike)
        t = [max(np.quantile(np.abs(v[v != 0]), 0.1), 1e-12) if (v != 0).any() else 1.0 for v in a[:, :2].T]
        fwd = (lambda v, i: _symlog(v, t[i])) if symlog else (lambda v, i: v)
        inv = (lambda u, i: _symlog_inv(u, t[i])) if symlog else (lambda u, i: u)
        u = np.stack([fwd(a[:, i], i) for i in (0, 1)], 1)
        lo, hi = u.min(0), u.max(0)
        pad = np.where(hi > lo, hi - lo, 1.0) * 0.3  # room for the outer contour
        g = [np.linspace(lo[i] - pad[i], hi[i] + pad[i], 80) for i in (0, 1)]
        for j, label in enumerate(W_LABELS):
            sel = group == j
            if not sel.any():
                continue
            name = f"w_npo {label}" if j < 5 else f"w_npo {label} (outside the paper's groups)"
            ax.scatter(a[sel, 0], a[sel, 1], s=12, color=colors[j], alpha=0.85, linewidths=0 if j < 5 else 1,
                       marker="o" if j < 5 else "x", label=f"{name}: {int(sel.sum())}")
            z = kde_grid(u[sel, 0], u[sel, 1], *g)
            if z is not None:
                gx, gy = np.meshgrid(inv(g[0], 0), inv(g[1], 1))
                ax.contour(gx, gy, z, levels=mass_levels(z), colors=[colors[j]], linewidths=1.2)
        ax.axhline(0, color="black", lw=0.5)
        ax.axvline(0, color="black", lw=0.5)
        if symlog:
            ax.set_xscale("symlog", linthresh=t[0])
            ax.set_yscale("symlog", linthresh=t[1])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("unlearning PG-effect (D_u)")
        ax.set_ylabel("retaining PG-effect (D_r)")
        ax.legend(fontsize=6.5, title="samples per weight group", title_fontsize=6.5, loc="best", framealpha=0.8)
    fig.tight_layout()
    return fig


def pointwise(run_dirs, out, steps=(5, 10, 15), separate=False, symlog=False, dpi=110):
    """`pointwise`: write pointwise_figure to `out` (figure_path); returns the path."""
    out = figure_path(out)
    return _save(pointwise_figure(run_dirs, steps, separate, symlog), out, dpi)


# ---------------------------------------------------------------------- tokens: the token weights (Appendix F.2)

def read_tokens(run_dir) -> tuple:
    """(method name, {(row, epoch): logged row}) of a run folder; raises UsageError."""
    path = Path(run_dir) / "token_weights.jsonl"
    if not path.is_file():
        raise common.UsageError(f"{path} does not exist: run wga.py, tnpo.py or wtnpo.py with --log-token-weights")
    keys = {"row", "epoch", "step", "question", "tokens", "weights"}
    try:
        rows = {}
        for line in filter(str.strip, open(path)):
            r = json.loads(line)
            if not isinstance(r, dict) or not keys <= r.keys() or not r["tokens"] \
                    or len(r["tokens"]) != len(r["weights"]):
                raise ValueError(f"a row needs {', '.join(sorted(keys))}, with one weight per token: {line.strip()[:80]}")
            rows[(r["row"], r["epoch"])] = r
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise common.UsageError(f"{path} is not valid token-weight JSON Lines: {e}")
    if not rows:
        raise common.UsageError(f"{path} has no rows")
    try:  # the script that made the run
        method = str(read_args(run_dir).get("method", Path(run_dir).name)).upper()
    except (common.UsageError, AttributeError):
        method = Path(run_dir).name
    return method, rows


def token_colors(weights, top, cmap="Reds") -> list:
    """(background, text colour) hex pairs: the weight on 0..top, darker = higher, white text on dark."""
    cm = matplotlib.colormaps[cmap]
    out = []
    for w in weights:
        x = min(max(w / top, 0.0), 1.0) if top > 0 else 0.0
        out.append((matplotlib.colors.to_hex(cm(x)), "#ffffff" if x > 0.6 else "#000000"))
    return out


def _token_data(run_dirs, rows, epochs, scale):
    """Checked input of `tokens`: [(name, method, {(row, epoch): logged row}, top)], questions, rows, epochs."""
    runs = []
    for d in run_dirs:
        method, logged = read_tokens(d)
        have_rows, have_epochs = sorted({r for r, _ in logged}), sorted({e for _, e in logged})
        for r in rows:
            if r not in have_rows:
                some = ", ".join(map(str, have_rows)) if len(have_rows) <= 8 else \
                    f"{len(have_rows)} of them, {have_rows[0]}..{have_rows[-1]}"
                raise common.UsageError(f"forget row {r} is not in {Path(d) / 'token_weights.jsonl'} (it has rows "
                                        f"{some})")
        for e in epochs or have_epochs:
            if e not in have_epochs:
                raise common.UsageError(f"epoch {e} is not in {Path(d) / 'token_weights.jsonl'} (it has epochs "
                                        f"{', '.join(map(str, have_epochs))})")
        runs.append([d, method, logged, have_epochs])
    epochs = epochs or runs[0][3]
    for d, _, logged, _ in runs:
        for r in rows:
            for e in epochs:
                if (r, e) not in logged:
                    raise common.UsageError(f"forget row {r} at epoch {e} is not in {Path(d) / 'token_weights.jsonl'}")
    questions = {r: runs[0][2][(r, epochs[0])]["question"] for r in rows}
    for d, _, logged, _ in runs[1:]:
        if any(logged[(r, epochs[0])]["question"] != questions[r] for r in rows):
            raise common.UsageError(f"{d} has other forget rows than {runs[0][0]}: compare runs on one split")
    shown = lambda logged: [w for r in rows for e in epochs for w in logged[(r, e)]["weights"]]
    shared = max(max(shown(logged)) for _, _, logged, _ in runs)
    out = [(d, method, logged, shared if scale == "shared" else max(shown(logged))) for d, method, logged, _ in runs]
    return out, questions, epochs


TOKENS_CSS = """
body { font-family: sans-serif; max-width: 70em; margin: 1em auto; color: #222; }
.q { font-weight: bold; margin: 0.3em 0 0.6em; }
h3 { font-size: 1em; margin: 0.8em 0 0.2em; }
.run { font-weight: normal; color: #777; font-size: 0.85em; }
.bar { display: inline-block; width: 10em; height: 0.8em; vertical-align: middle; border: 1px solid #bbb;
       margin: 0 0.4em; }
.line { font-family: monospace; white-space: pre-wrap; line-height: 1.7; margin: 0.1em 0; }
.ep { display: inline-block; width: 3.5em; color: #555; }
.t { box-shadow: inset -1px 0 #fff; }
"""


def tokens_html(runs, questions, epochs, scale) -> str:
    """The page: per forget row its question, then per run and epoch the answer, each token shaded by its weight."""
    bar = ", ".join(c for c, _ in token_colors([k / 8 for k in range(9)], 1.0))
    what = ("one scale for all runs" if scale == "shared" else "one scale per run") + \
        ", from 0 (white) to the largest weight shown (darkest)"
    out = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>Token weights</title>',
           f"<style>{TOKENS_CSS}</style></head><body>", "<h1>Token weights</h1>",
           f"<p>Each answer token's background is its weight in the run's loss at the step of that epoch that saw the "
           f"row (darker = higher; {escape(what)}). Hover a token for its weight, an EP label for its step.</p>"]
    for r, q in questions.items():
        out.append(f"<h2>Forget row {r}</h2><p class=\"q\">Question: {escape(q)}</p>")
        for d, method, logged, top in runs:
            out.append(f'<h3>{escape(method)} <span class="run">{escape(Path(d).name)}</span> '
                       f'<span class="run">0</span><span class="bar" style="background: linear-gradient(to right, '
                       f'{bar})"></span><span class="run">{top:.3g}</span></h3>')
            for e in epochs:
                rec = logged[(r, e)]
                spans = "".join(f'<span class="t" style="background:{bg};color:{fg}" title="{w:.4g}">{escape(t)}</span>'
                                for t, w, (bg, fg) in zip(rec["tokens"], rec["weights"],
                                                          token_colors(rec["weights"], top)))
                out.append(f'<div class="line"><span class="ep" title="step {rec["step"]}">EP{e}</span>{spans}</div>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def tokens_png(runs, questions, epochs, scale, path):
    """The page's content as an image: each token a text box coloured by its weight, the paper's EP lines."""
    width, dpi, size = 1100, 100, 9  # pixels, dots per inch, font points
    font, bold = FontProperties(size=size), FontProperties(size=size + 1, weight="bold")
    scratch = plt.figure(dpi=dpi)
    renderer = scratch.canvas.get_renderer()
    measure = lambda s, f=font: renderer.get_text_width_height_descent(s, f, ismath=False)[0]
    line, gap, left, indent = 17, 2, 10, 50
    items, bars, y = [], [], 8  # (x, y from the top, text, font, box colours), colour bars; pixels
    for r, q in questions.items():
        y += line + 4
        items.append((left, y, f"Forget row {r}. {q}", bold, None))
        for d, method, logged, top in runs:
            y += line + 2
            label = f"{method}  ({Path(d).name})   0"
            items.append((left, y, label, font, None))
            x = left + measure(label) + 6
            bars.append((x, y, top))
            items.append((x + 126, y, f"{top:.3g}" + ("  (shared scale)" if scale == "shared" else ""), font, None))
            for e in epochs:
                y += line
                items.append((left + 8, y, f"EP{e}", font, None))
                x = left + indent
                rec = logged[(r, e)]
                for t, (bg, fg) in zip(rec["tokens"], token_colors(rec["weights"], top)):
                    shown = t.strip() or "\u2423"  # the PNG separates tokens by a gap; a bare space shows as a mark
                    x += measure(" ") if t[:1].isspace() and x > left + indent else 0
                    w = measure(shown)
                    if x + w > width - left:  # wrap, indented
                        x, y = left + indent, y + line
                    items.append((x, y, shown, font, (bg, fg)))
                    x += w + gap
    height = y + line
    width = min(width, max(x + measure(text, f) for x, _, text, f, _ in items) + 2 * left)  # no blank margin
    plt.close(scratch)
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    for x, yy, text, f, colors in items:
        kw = dict(bbox=dict(boxstyle="square,pad=0.12", fc=colors[0], ec="none"), color=colors[1]) if colors else {}
        fig.text(x / width, 1 - yy / height, text, fontproperties=f, va="baseline", ha="left", parse_math=False,
                 **kw)
    grad = [[k / 63 for k in range(64)]]
    for x, yy, _ in bars:
        ax = fig.add_axes((x / width, 1 - (yy + 1) / height, 120 / width, 10 / height))
        ax.imshow(grad, cmap="Reds", aspect="auto", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
    tmp = f"{path}.tmp.png"
    try:
        fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return tmp


def tokens(run_dirs, out, rows, epochs, scale="run") -> str:
    """`tokens`: write the token-weight page FILE.html and its image FILE.png (figure_path; each atomically,
    nothing written on bad input); returns the HTML's path."""
    if Path(str(out)).suffix.lower() not in (".html", ".htm"):
        raise common.UsageError(f"-o must name an .html file (the image goes beside it as .png), got {out}")
    out = figure_path(out, page=True)
    if not rows or len(set(rows)) != len(rows):
        raise common.UsageError("--rows needs one or more distinct forget row indices")
    runs, questions, epochs = _token_data(run_dirs, rows, epochs, scale)
    png = str(Path(out).with_suffix(".png"))
    page = tokens_html(runs, questions, epochs, scale)
    tmp, tmp_png = f"{out}.tmp", f"{png}.tmp.png"
    try:
        tokens_png(runs, questions, epochs, scale, png)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp_png, png)
        os.replace(tmp, out)
    finally:  # nothing half-written
        for t in (tmp, tmp_png):
            if os.path.exists(t):
                os.remove(t)
    return out


# -------------------------------------------------------------------- delta: what the real step did to the risks

def delta(run_dirs, out, dpi=110) -> str:
    """`delta`: per run, the actual change of R(D_u) (red) and of R(D_r) (blue) at each measured step,
    solid, with the paper's prediction -lr e (dotted) and the real update's grad R . (theta_t+1 - theta_t)
    (dashed) over it (geffect.jsonl's "delta": --geffect-order 1 or 2), on a symlog scale; a row per --reg
    (sorted), a column per method (in the order given). Returns the path written (figure_path)."""
    runs, cells = [], {}
    for d in run_dirs:
        rows, _ = read_run(d)
        if not all("delta" in r for r in rows):
            raise common.UsageError(f"{d}: its geffect.jsonl rows have no delta (run it with --geffect-order 1 or 2)")
        a = read_args(d)
        cell = (str(a.get("reg")), str(a.get("method", Path(d).name)))
        if cell in cells:
            raise common.UsageError(f"{cells[cell]} and {d} are both {cell[1].upper()} with --reg {cell[0]}: "
                                    "one run a cell")
        cells[cell] = d
        runs.append((cell, rows))
    out = figure_path(out)
    regs = sorted({reg for (reg, _), _ in runs})
    methods = list(dict.fromkeys(m for (_, m), _ in runs))
    fig, axes = plt.subplots(len(regs), len(methods), figsize=(3.0 * len(methods), 3.0 * len(regs)), squeeze=False)
    for (reg, m), rows in runs:
        i, j = regs.index(reg), methods.index(m)
        ax = axes[i][j]
        steps = [r["step"] for r in rows]
        for d, color in (("unlearn", "tab:red"), ("retain", "tab:blue")):
            ax.plot(steps, [r["delta"][d]["actual"] for r in rows], "-", color=color, lw=1.8, label=f"{d}: actual")
            ax.plot(steps, [r["delta"][d]["gradient"] for r in rows], ":", color=color, lw=1.2,
                    label=f"{d}: -lr e (paper)")
            ax.plot(steps, [r["delta"][d]["update"] for r in rows], "--", color=color, lw=1.0,
                    label=f"{d}: grad R . update")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_title(f"{m.upper()}, {reg}", fontsize=9)
        ax.set_xlabel("step")
        if j == 0:
            ax.set_ylabel("change of R")
    for i, j in np.ndindex(axes.shape):  # a cell without a run stays blank
        if (regs[i], methods[j]) not in cells:
            axes[i][j].axis("off")
    (reg, m), _ = runs[0]
    handles, labels = axes[regs.index(reg)][methods.index(m)].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(fig, out, dpi)


# ---------------------------------------------------------- relearn: attack.py's relearning attack, ES on V against S

def read_attack(path) -> tuple:
    """(attack.json's content, its relearning rows sorted by S) of attack.py's output; raises UsageError when it
    is not one, or holds no relearning attack."""
    d = read_json(Path(path), "give an attack.json that attack.py wrote")
    ok = isinstance(d, dict) and isinstance(d.get("attacks"), list) and isinstance(d.get("before"), dict)
    rows = [a for a in d["attacks"] if isinstance(a, dict) and a.get("attack") == "relearn"] if ok else []
    if not ok:
        raise common.UsageError(f"{path} needs before and attacks: is it attack.py's attack.json?")
    if not rows:
        raise common.UsageError(f"{path} holds no relearning attack (attack.py ran with --relearn-steps none)")
    return d, sorted(rows, key=lambda a: a["steps"])


def relearn(paths, out, dpi=110) -> str:
    """`relearn`: ES-exact on V against the relearning steps S, one colour per attack.json: the unlearned model
    solid, its control (the retain-only model relearnt alike) dashed, the original model's level dotted; S = 0
    is each model before relearning. Returns the path written (figure_path)."""
    runs = [read_attack(p) for p in paths]
    out = figure_path(out)
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for k, (d, rows) in enumerate(runs):
        color, b = f"C{k}", d["before"]
        name = f"{Path(str(d.get('model'))).name} ({rows[0].get('on')})"
        S = [0] + [a["steps"] for a in rows]
        ax.plot(S, [b["unlearned"]["es_exact_v"]] + [a["es_exact_v"] for a in rows], "o-", color=color, label=name)
        control = [(b.get("retain_only") or {}).get("es_exact_v")] + [a.get("control_es_exact_v") for a in rows]
        if None not in control:
            ax.plot(S, control, "s--", color=color, lw=1, ms=4, label=f"{name}: control (retain-only)")
        ax.axhline(b["original"]["es_exact_v"], color=color, ls=":", lw=1, label=f"{name}: original")
    ax.set_xticks(sorted({0} | {a["steps"] for _, rows in runs for a in rows}))
    ax.set_xlabel("relearning steps S on T")
    ax.set_ylabel("ES-exact on V")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, out, dpi)


def table1_relearn(table1_json, out, dpi=110) -> str:
    """sweep.py --attacks' figure: ES-exact on V against the relearning steps S, one panel per split, one line per
    Table 1 pick (the mean over its seeds), the control (the retain-only model relearnt alike) dashed black, the
    model before unlearning dotted grey. S = 0 is each model before relearning. Returns the path written."""
    d = read_json(Path(table1_json), "give a table1.json that sweep.py --attacks wrote")
    cells = [c for c in d.get("cells", []) if "attacks" in c] if isinstance(d, dict) else []
    if not cells:
        raise common.UsageError(f"{table1_json} holds no attack columns: run sweep.py with --attacks")
    splits = [sp for sp in common.SPLITS if any(c["split"] == sp for c in cells)]
    steps = [0] + [x["steps"] for x in d["attacks"][0]["relearn"]]
    fig, axes = plt.subplots(1, len(splits), figsize=(4.6 * len(splits), 3.8), squeeze=False)
    methods = list(dict.fromkeys(c["method"] for c in cells if c["method"] is not None))
    for ax, sp in zip(axes[0], splits):
        for c in (c for c in cells if c["split"] == sp):
            y = c["attacks"]["es_exact_v_mean"]
            if c["method"] is None:
                ax.plot(steps, y, ":", color="grey", label="before unlearning")
            else:
                k = methods.index(c["method"])
                ax.plot(steps, y, marker="o", ms=3, lw=1.2, color=f"C{k % 10}", ls="-" if k < 10 else "-.",
                        label=TITLES.get(c["method"], c["method"].upper()))
        ctl = (d.get("attack_controls") or {}).get(sp) or {}
        if ctl.get("relearn"):
            ax.plot(steps, [ctl["before_v"]["es_exact_v"]] + [x["es_exact_v"] for x in ctl["relearn"]], "s--",
                    color="black", ms=3, lw=1.2, label="control (retain-only)")
        ax.set_title(f"{sp} (T, V: {ctl.get('on', 'other-authors')})", fontsize=9)
        ax.set_xticks(steps)
        ax.set_xlabel("relearning steps S on T")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ES-exact on V")
    handles, labels = axes[0][0].get_legend_handles_labels()
    _legend_below(fig, handles, labels)
    return _save(fig, figure_path(out), dpi)


# ---------------------------------------------------------------- tuning: sweep.py's tuning curves (Tables 2-10)

TITLES = dict(simnpo="SimNPO", satimp="SatImp", idkdpo="IdkDPO")  # the others: the script's name in capitals


def tuning_tables(rows: list, layers: dict) -> list:
    """Tables 2-10 of a sweep's rows: (title, swept param, method, fixed params, {split: [rows sorted
    by the swept param]}); `layers` names RMU's hidden states (shallow, middle, deep)."""
    out = []
    specs = [("wga", "alpha", {}), ("npo", "beta", {}), ("tnpo", "beta", {})]
    specs += [("wtnpo", "beta", dict(alpha=a)) for a in sorted({r["params"]["alpha"] for r in rows
                                                                if r["method"] == "wtnpo"})]
    specs += [("rmu", "c", dict(layer=l)) for l in sorted({r["params"]["layer"] for r in rows if r["method"] == "rmu"})]
    specs += [("simnpo", "beta", dict(gamma=g)) for g in sorted({r["params"]["gamma"] for r in rows
                                                                if r["method"] == "simnpo"})]
    specs += [("satimp", "beta1", dict(beta2=b)) for b in sorted({r["params"]["beta2"] for r in rows
                                                                 if r["method"] == "satimp"})]
    specs += [("idkdpo", "beta", {}), ("undial", "beta", {})]
    where = {v: k for k, v in layers.items()}
    for method, param, fixed in specs:
        sel = [r for r in rows if r["method"] == method and all(r["params"].get(k) == v for k, v in fixed.items())]
        if not sel:
            continue
        title = TITLES.get(method, method.upper()) + "".join(f" ({k} = {v:g})" for k, v in fixed.items()
                                                             if k != "layer")
        if "layer" in fixed:
            title += f" (hidden state {fixed['layer']}" + (f", {where[fixed['layer']]})" if fixed["layer"] in where
                                                          else ")")
        by_split = {sp: sorted([r for r in sel if r["split"] == sp], key=lambda r: r["params"][param])
                    for sp in common.SPLITS if any(r["split"] == sp for r in sel)}
        out.append((title, param, method, fixed, by_split))
    return out


def tuning_name(method: str, fixed: dict) -> str:
    """A tuning table's figure, without .png: tuning-npo, tuning-wtnpo-alpha0.5, tuning-rmu-layer4."""
    return "tuning-" + "-".join([method] + [f"{k}{v:g}" for k, v in fixed.items()])


def tuning_figure(path, title: str, param: str, by_split: dict, before: dict) -> str:
    """Unlearn ES-exact and ES-perturb after UWC against the hyper-parameter, one line per split,
    the original model's level dashed in the split's colour."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, col, label in zip(axes, ("es_exact_unlearn", "es_perturb_unlearn"), ("ES-exact", "ES-perturb")):
        for k, (sp, rs) in enumerate(by_split.items()):
            color = f"C{k}"
            ax.plot([r["params"][param] for r in rs], [r[col] for r in rs], "o-", color=color, label=sp)
            if sp in before:
                ax.axhline(before[sp][col], color=color, ls="--", lw=1, label=f"{sp} before unlearning")
        values = sorted({r["params"][param] for rs in by_split.values() for r in rs})
        if values[0] > 0:
            ax.set_xscale("log")
        else:  # RMU's c = 0 (the random target at the origin)
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(values, [f"{v:g}" for v in values], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(param)
        ax.set_title(f"{label} unlearn after UWC ↓")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ES on the forget rows")
    fig.suptitle(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12 if len(labels) > 3 else 0.08, 1, 1))
    return _save(fig, str(path), 110)


def read_sweep(sweep_dir) -> dict:
    """A sweep folder's sweep.json (rows, rmu_layers, before); raises UsageError."""
    path = Path(sweep_dir) / "sweep.json"
    sweep = read_json(path, "give a folder sweep.py wrote")
    if not isinstance(sweep, dict) or not {"rows", "rmu_layers", "before"} <= sweep.keys():
        raise common.UsageError(f"{path} needs rows, rmu_layers and before: is it sweep.py's?")
    return sweep


def tuning(sweep_dir, names=None, out=None) -> list:
    """`tuning`: the figure of every tuning table of a sweep folder (sweep.json), or of those named
    (tuning-npo or npo, ...), into `out` (a folder; default: the sweep folder, where sweep.py writes
    them). Returns the paths written."""
    sweep = read_sweep(sweep_dir)
    tables = {tuning_name(method, fixed): (title, param, by_split)
              for title, param, method, fixed, by_split in tuning_tables(sweep["rows"], sweep["rmu_layers"])}
    if not tables:
        raise common.UsageError(f"{sweep_dir}/sweep.json has no tuning table (GA and PO have no grid)")
    want = [n.removesuffix(".png") for n in names or tables]
    want = [n if n.startswith("tuning-") else f"tuning-{n}" for n in want]
    unknown = [n for n in want if n not in tables]
    if unknown:
        raise common.UsageError(f"{sweep_dir} has no tuning table {unknown[0]} (it has {', '.join(tables)})")
    folder = Path(sweep_dir if out is None else out)
    if not folder.is_dir():
        raise common.UsageError(f"-o {folder}: the folder does not exist")
    return [tuning_figure(folder / f"{n}.png", *tables[n], sweep["before"]) for n in want]


# --------------------------------------------------------------------------------------------------- the command

def main(argv=None):
    parser = common.make_parser(__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("geffect", help="the G-effect of one or more runs (Figure 3's layout)")
    p.add_argument("runs", nargs="+", help="run folders with a geffect.jsonl")
    p.add_argument("-o", "--out", default="geffect.png", help="image file to write (a bare name goes under out/)")
    p.add_argument("--symlog", action="store_true", help="symmetric log scale for the G-effect")
    p.add_argument("--dpi", type=int, default=130, help="resolution of the image")
    p = sub.add_parser("panels", help="runs side by side, titled and arranged by the flags that differ "
                                      "(Figures 4/11, 8, 12)")
    p.add_argument("runs", nargs="+", help="run folders with a geffect.jsonl and an args.json")
    p.add_argument("--rows", default=None, help="args.json key whose sorted values make the rows (e.g. layer)")
    p.add_argument("--cols", default=None, help="args.json key whose sorted values make the columns (e.g. c)")
    p.add_argument("-o", "--out", default="geffect-panels.png", help="image file to write (a bare name goes under out/)")
    p.add_argument("--symlog", action="store_true", help="symmetric log scale for the G-effect")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the image")
    p = sub.add_parser("pointwise", help="NPO's weight against each forget sample's PG-effect (Figures 5b, 16, 17)")
    p.add_argument("runs", nargs="+", help="NPO run folders made with --geffect-pointwise")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 15], help="checkpoints (the step of log.jsonl)")
    p.add_argument("--separate", action="store_true", help="one panel per run and step (Figure 17), not joined")
    p.add_argument("-o", "--out", default="geffect-pointwise.png", help="image file to write (a bare name goes under out/)")
    p.add_argument("--symlog", action="store_true", help="symmetric log scales (the PG-effect spans decades)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the image")
    t = sub.add_parser("tokens", help="the forget answers' tokens shaded by their weights (Appendix F.2), as HTML "
                                      "and PNG")
    t.add_argument("runs", nargs="+", help="run folders with a token_weights.jsonl (--log-token-weights)")
    t.add_argument("--rows", type=int, nargs="+", default=[0, 1],
                   help="forget rows to show, by index in the split (default: 0 1)")
    t.add_argument("--epochs", type=int, nargs="+", default=None, help="epochs to show (default: every logged one)")
    t.add_argument("--scale", choices=("run", "shared"), default="run",
                   help="colour scale from 0 to the largest weight shown: per run, or one for all runs")
    t.add_argument("-o", "--out", default="token_weights.html",
                   help="HTML file to write, its PNG beside it (a bare name goes under out/)")
    p = sub.add_parser("tuning", help="sweep.py's tuning curves, from a sweep folder's sweep.json")
    p.add_argument("sweep", help="a folder sweep.py wrote (its sweep.json)")
    p.add_argument("names", nargs="*", help="figures to draw, e.g. npo or tuning-rmu-layer4 (default: all)")
    p.add_argument("-o", "--out", default=None, help="folder to write them into (default: the sweep folder)")
    p = sub.add_parser("delta", help="what the real step did to each risk against the G-effect's prediction")
    p.add_argument("runs", nargs="+", help="run folders made with --geffect-order 1 or 2 (one per method and --reg)")
    p.add_argument("-o", "--out", default="geffect-delta.png", help="image file to write (a bare name goes under out/)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the image")
    p = sub.add_parser("relearn", help="attack.py's relearning: ES-exact on V against the steps, the control dashed")
    p.add_argument("attacks", nargs="+", help="attack.json files that attack.py wrote")
    p.add_argument("-o", "--out", default="attack-relearn.png", help="image file to write (a bare name goes under out/)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the image")
    args = parser.parse_args(argv)
    try:
        if getattr(args, "dpi", 1) < 1:
            raise common.UsageError(f"--dpi must be positive, got {args.dpi}")
        if args.cmd == "geffect":
            out = geffect(args.runs, args.out, args.symlog, args.dpi)
        elif args.cmd == "panels":
            out = panels(args.runs, args.out, args.rows, args.cols, args.symlog, args.dpi)
        elif args.cmd == "pointwise":
            steps = list(dict.fromkeys(args.steps))
            if min(steps) < 1:
                raise common.UsageError(f"--steps are steps of log.jsonl, from 1; got {min(steps)}")
            out = pointwise(args.runs, args.out, steps, args.separate, args.symlog, args.dpi)
        elif args.cmd == "tokens":
            out = tokens(args.runs, args.out, args.rows, args.epochs, args.scale)
        elif args.cmd == "tuning":
            out = "\n".join(tuning(args.sweep, args.names, args.out))
        elif args.cmd == "relearn":
            out = relearn(args.attacks, args.out, args.dpi)
        else:
            out = delta(args.runs, args.out, args.dpi)
    except common.UsageError as e:
        common.die(str(e))
    print(out)
    return out


if __name__ == "__main__":
    main()
