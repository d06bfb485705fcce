"""benchmarks/claims.py: a claim's verdict and a newer objective's placement among the paper's seven, by the rule
that a difference counts only when the per-seed values do not overlap (sweep.beyond_noise)."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import claims  # noqa: E402


def cells_of(values: dict) -> dict:
    """Hand-made cells of one split: method -> per-seed values of unlearn ES-exact after UWC and unmixed."""
    return {("forget05", m): {t: {"es_exact_unlearn": dict(values=v, mean=sum(v) / len(v))} for t in ("uwc", "unmixed")}
            for m, v in values.items()}


def test_verdict_and_placement():
    paper = dict(ga=[0.30, 0.32, 0.31], po=[0.80, 0.85, 0.82], wga=[0.10, 0.12, 0.11], npo=[0.20, 0.22, 0.21],
                 tnpo=[0.15, 0.21, 0.16], wtnpo=[0.10, 0.11, 0.12], rmu=[0.40, 0.41, 0.42])
    cells = cells_of(dict(paper, simnpo=[0.16, 0.17, 0.18]))
    # below NPO, GA, PO, RMU (no overlap); above WGA and WTNPO; TNPO's range [0.15, 0.21] overlaps
    assert claims.placement(cells, "forget05", "simnpo") == \
        "0.170; below GA, PO, NPO, RMU; above WGA, WTNPO; level with TNPO"
    simnpo_vs_npo = claims.NEWER_CLAIMS[0][1]
    assert claims.verdict(cells, "forget05", simnpo_vs_npo) == ("holds", "")
    cells = cells_of(dict(paper, simnpo=[0.25, 0.26, 0.27]))
    assert claims.verdict(cells, "forget05", simnpo_vs_npo) == ("contradicted", "the other way: SimNPO vs NPO")
    cells = cells_of(dict(paper, simnpo=[0.19, 0.21, 0.23]))
    assert claims.verdict(cells, "forget05", simnpo_vs_npo) == ("within the noise", "overlapping: SimNPO vs NPO")
