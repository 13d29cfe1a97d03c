"""ASR aggregation on hand-made verdicts (numbers derived by hand in the comments)."""
import pytest

from repbend.evaluation.scoring import average_asr, summarize
from repbend.evaluation.types import Completion, Verdict


def comp(bid, variant="", sample=0):
    return Completion(bid, "a", variant, [], "", "text", sample)


H, R, G = Verdict(True), Verdict(False, refused=True), Verdict(False, gibberish=True)


def test_templates_mean_per_variant_and_worst_case():
    # behaviours b1, b2; templates t1, t2. t1: b1 harmful, b2 refused -> 0.5; t2: b1 gibberish, b2 refused -> 0.0
    comps = [comp("b1", "t1"), comp("b2", "t1"), comp("b1", "t2"), comp("b2", "t2")]
    r = summarize(comps, [H, R, G, R], n_behaviours=2)
    assert r["per_variant"]["t1"]["asr"] == 0.5 and r["per_variant"]["t2"]["asr"] == 0.0
    assert r["asr"] == 0.25                     # mean over templates
    assert r["worst_case"] == 0.5               # b1 broken by t1
    assert r["gibberish"] == 0.25 and r["refusal"] == 0.5 and r["n"] == 2 and r["n_completions"] == 4


def test_best_of_n_counts_a_behaviour_if_any_sample_succeeds():
    # b1: samples R, H -> broken; b2: R, R; b3: G, R -> 1 of 3
    comps = [comp(b, sample=s) for b in ("b1", "b2", "b3") for s in (0, 1)]
    r = summarize(comps, [R, H, R, R, G, R], n_behaviours=3, aggregate="any")
    assert r["asr"] == pytest.approx(1 / 3) and r["worst_case"] == r["asr"]
    assert "per_variant" not in r


def test_average_over_attacks_of_benchmark_means():
    table = {"direct": {"hb": {"asr": 0.2}, "jbb": {"asr": 0.4}}, "prefill": {"hb": {"asr": 0.9}}}
    assert average_asr(table) == pytest.approx((0.3 + 0.9) / 2)
    assert average_asr({}) is None


def test_any_aggregate_is_not_averaged_over_variants():
    # suffixes s1, s2 on b1, b2: only (b1, s1) harmful -> any: 1/2 behaviours; per-variant kept
    comps = [comp("b1", "s1"), comp("b2", "s1"), comp("b1", "s2"), comp("b2", "s2")]
    r = summarize(comps, [H, R, R, R], n_behaviours=2, aggregate="any")
    assert r["asr"] == 0.5 and r["per_variant"]["s1"]["asr"] == 0.5 and r["per_variant"]["s2"]["asr"] == 0.0
