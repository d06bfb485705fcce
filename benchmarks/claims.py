"""
The paper's claims, checked against a sweep's Table 1 over unlearning seeds (sweep.py --seeds N) by
one rule, sweep.beyond_noise: a difference between two methods counts only when their per-seed
values do not overlap. Each claim is a set of pairwise comparisons on one split; it holds where
every comparison goes its way beyond the noise, is contradicted where one goes the other way beyond
the noise, and is undecided (within the noise) otherwise.

    python benchmarks/claims.py out/sweep/tiny                  # markdown tables on stdout
    python benchmarks/claims.py out/sweep/tiny --out claims.md

Where the sweep has them, the four newer objectives get two more tables: their own papers' claims against the
paper's method each builds on, and where each lands among the paper's seven at equal retention (after UWC).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import sweep  # noqa: E402

# (claim, [(table, column, a, b, sign)]): sign 1 means a's values lie above b's, -1 below.
# "unmixed" is Table 1 as the paper builds it; "uwc" the same picks after UWC (equal retention).
PAPER = sweep.METHODS[:7]  # the paper's seven methods: its claims compare these (not SimNPO, SatImp, IdkDPO, UNDIAL)
FAMILY = ("ga", "npo", "tnpo", "wtnpo")  # the GA family beside WGA: GA and the NPO objectives
CLAIMS = [
    ("GA removes the most (unmixed unlearn ES-exact below every other method's)",
     [("unmixed", "es_exact_unlearn", "ga", m, -1) for m in PAPER if m != "ga"]),
    ("GA damages retention the most (unmixed retain ES-exact below every other method's)",
     [("unmixed", "es_exact_retain", "ga", m, -1) for m in PAPER if m != "ga"]),
    ("PO barely removes (unmixed unlearn ES-exact above every other method's)",
     [("unmixed", "es_exact_unlearn", "po", m, 1) for m in PAPER if m != "po"]),
    ("WGA keeps retention best in the GA family (unmixed retain ES-exact above GA's, NPO's, TNPO's, WTNPO's)",
     [("unmixed", "es_exact_retain", "wga", m, 1) for m in FAMILY]),
    ("TNPO improves on NPO (unlearn ES-exact after UWC below NPO's)", [("uwc", "es_exact_unlearn", "tnpo", "npo", -1)]),
    ("WTNPO improves on NPO (unlearn ES-exact after UWC below NPO's)", [("uwc", "es_exact_unlearn", "wtnpo", "npo", -1)]),
    ("WTNPO improves on TNPO (unlearn ES-exact after UWC below TNPO's)",
     [("uwc", "es_exact_unlearn", "wtnpo", "tnpo", -1)]),
    ("WGA and WTNPO stand out (after UWC their unlearn ES-exact is below every other method's)",
     [("uwc", "es_exact_unlearn", a, m, -1) for a in ("wga", "wtnpo") for m in PAPER
      if m not in ("wga", "wtnpo")]),
]


NEWER = sweep.METHODS[7:]
NEWER_CLAIMS = [
    ("SimNPO improves on NPO (unlearn ES-exact after UWC below NPO's)", [("uwc", "es_exact_unlearn", "simnpo", "npo", -1)]),
    ("SatImp improves on WGA (unlearn ES-exact after UWC below WGA's)", [("uwc", "es_exact_unlearn", "satimp", "wga", -1)]),
    ("IdkDPO removes more than PO (unmixed unlearn ES-exact below PO's)",
     [("unmixed", "es_exact_unlearn", "idkdpo", "po", -1)]),
    ("UNDIAL keeps retention better than GA (unmixed retain ES-exact above GA's)",
     [("unmixed", "es_exact_retain", "undial", "ga", 1)]),
]


def placement(cells: dict, split: str, m: str, table="uwc", col="es_exact_unlearn") -> str:
    """Where method m lands among the paper's seven on one column: the methods its per-seed values lie below
    beyond the noise (it removes more than they do), above, and level with (overlapping)."""
    groups = {-1: [], 1: [], 0: []}
    for other in PAPER:
        xs, ys = (cells[(split, x)][table][col]["values"] for x in (m, other))
        groups[sweep.beyond_noise(xs, ys)].append(sweep.NAMES[other])
    mean = cells[(split, m)][table][col]["mean"]
    return (f"{mean:.3f}; below " + (", ".join(groups[-1]) or "none") + "; above " + (", ".join(groups[1]) or "none")
            + "; level with " + (", ".join(groups[0]) or "none"))


def verdict(cells: dict, split: str, comparisons: list) -> tuple:
    """('holds' | 'contradicted' | 'within the noise', the comparisons that decided it)."""
    got = []
    for table, col, a, b, sign in comparisons:
        xs, ys = (cells[(split, m)][table][col]["values"] for m in (a, b))
        got.append((sweep.beyond_noise(xs, ys), sign, f"{sweep.NAMES[a]} vs {sweep.NAMES[b]}"))
    against = [name for d, sign, name in got if d == -sign]
    if against:
        return "contradicted", "the other way: " + ", ".join(against)
    undecided = [name for d, sign, name in got if d == 0]
    if undecided:
        return "within the noise", "overlapping: " + ", ".join(undecided)
    return "holds", ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", help="a sweep.py --method all folder with table1.json")
    p.add_argument("--out", default=None, help="write the markdown here (default: stdout)")
    args = p.parse_args(argv)
    f = Path(args.sweep_dir) / "table1.json"
    try:
        t1 = json.loads(f.read_text())
        cells = {(c["split"], c["method"]): c for c in t1["cells"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        p.error(f"cannot read the cells of {f} ({e}); it is written by sweep.py --seeds N")
    splits = [sp for sp in common.SPLITS if all((sp, m) in cells for m in PAPER)]
    if not splits:
        p.error(f"{f} has no split with each of the paper's seven methods: run sweep.py --method all")
    lines = [f"Seeds {', '.join(map(str, t1['seeds']))}; rule: sweep.beyond_noise (no overlap of the per-seed values).\n",
             "| claim | " + " | ".join(splits) + " |", "| --- " * (len(splits) + 1) + "|"]
    for claim, comparisons in CLAIMS:
        row = []
        for sp in splits:
            v, why = verdict(cells, sp, comparisons)
            row.append(v + (f" ({why})" if why else ""))
        lines.append(f"| {claim} | " + " | ".join(row) + " |")
    new = [m for m in NEWER if all((sp, m) in cells for sp in splits)]
    for title, claims in (("Claims of the four newer objectives' own papers", [
            c for c in NEWER_CLAIMS if all(x[2] in new for x in c[1])]),):
        if claims:
            lines += ["", f"{title}:\n", "| claim | " + " | ".join(splits) + " |", "| --- " * (len(splits) + 1) + "|"]
            for claim, comparisons in claims:
                lines.append(f"| {claim} | " + " | ".join(
                    v + (f" ({why})" if why else "") for v, why in (verdict(cells, sp, comparisons) for sp in splits))
                    + " |")
    if new:
        lines += ["", "Where the four land among the paper's seven at equal retention: unlearn ES-exact after UWC (the "
                      "mean), and the paper's methods whose per-seed values it lies below (removes more), above, or "
                      "overlaps:\n", "| method | " + " | ".join(splits) + " |", "| --- " * (len(splits) + 1) + "|"]
        lines += [f"| {sweep.NAMES[m]} | " + " | ".join(placement(cells, sp, m) for sp in splits) + " |" for m in new]
    text = "\n".join(lines) + "\n"
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    print(text, end="")


if __name__ == "__main__":
    main()
