"""CIDEr as the course grades it (PTBTokenizer + pycocoevalcap Cider), checked against the CIDEr-D formula by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from captionlab.metrics.cider import CocoCider, ngram_scores, ptb_tokenize, spice_unavailable_reason

# Three images; captions are already lower-case without punctuation, so PTB tokenization leaves them unchanged.
REFS = {"A": ["a red circle", "a big red circle"], "B": ["a blue square"], "C": ["green star"]}
HYPS = {"A": "a red circle", "B": "a blue square square", "C": "green star"}


def hand_cider() -> tuple[float, dict[str, float]]:
    """CIDEr-D (n=1..4, sigma=6, clipped tf-idf cosine, x10, mean over refs) for REFS/HYPS, worked out by hand.

    idf(g) = log(N) - log(max(1, df(g))) with N = 3 images; every n-gram occurs in the references of one image
    (idf l = log 3) except "a" (images A and B: idf ia = log 3 - log 2). Length penalty exp(-d^2 / 72)."""
    l, ia = math.log(3), math.log(3) - math.log(2)
    pen = math.exp(-1 / 72)  # |len(hyp) - len(ref)| = 1
    # A vs "a red circle": identical, n=1..3 cosine 1, no 4-grams -> 3/4.
    a1 = 3 / 4
    # A vs "a big red circle": n=1 {a,red,circle} . {a,big,red,circle}; n=2 one shared bigram of 2 vs 3; n>=3 none.
    cos1 = math.sqrt(ia**2 + 2 * l**2) / math.sqrt(ia**2 + 3 * l**2)
    a2 = (cos1 + 1 / math.sqrt(6)) / 4 * pen
    cider_a = 10 * (a1 + a2) / 2
    # B: hyp tf(square)=2 is clipped to the reference's tf 1; n=2: 2 shared of 3 vs 2; n=3: 1 shared of 2 vs 1.
    cos1 = math.sqrt(ia**2 + 2 * l**2) / math.sqrt(ia**2 + 5 * l**2)
    cider_b = 10 * (cos1 + 2 / math.sqrt(6) + 1 / math.sqrt(2) + 0) / 4 * pen
    cider_c = 10 * (1 + 1 + 0 + 0) / 4  # identical bigram caption
    per = {"A": cider_a, "B": cider_b, "C": cider_c}
    return sum(per.values()) / 3, per


def test_cider_matches_hand_computed_formula() -> None:
    expected, per = hand_cider()
    score, scores = CocoCider().compute_score({k: list(v) for k, v in REFS.items()}, {k: [v] for k, v in HYPS.items()})
    assert score == pytest.approx(expected, rel=1e-9)
    assert scores == pytest.approx([per[k] for k in REFS], rel=1e-9)
    assert expected == pytest.approx(5.2057, abs=1e-4)  # (5.2706 + 5.3465 + 5) / 3, worked on paper


def test_ngram_scores_tokenizes_like_the_course() -> None:
    """Upper case, punctuation and line breaks are normalised by PTBTokenizer: same CIDEr as the clean text."""
    expected, per = hand_cider()
    messy_refs = {"A": ["A red circle.", "a big, red circle!"], "B": ["A blue\nsquare"], "C": ["Green star ."]}
    messy_hyps = {"A": "A RED circle", "B": "a blue square, square.", "C": "green\r\nstar"}
    summary, per_image, unavailable = ngram_scores(messy_refs, messy_hyps, ("CIDEr", "BLEU", "ROUGE_L", "SPICE"))
    assert summary["CIDEr"] == pytest.approx(expected, rel=1e-9)
    assert per_image["cider"] == pytest.approx([per[k] for k in messy_refs], rel=1e-9)
    assert per_image["rouge_l"][2] == pytest.approx(1.0)  # C is identical to its reference
    assert 0 < summary["Bleu_1"] <= 1 and summary["Bleu_4"] <= summary["Bleu_1"]
    reason = spice_unavailable_reason()
    if reason is None:
        assert "SPICE" in summary
    else:  # offline: reported with the reason, never a crash
        assert unavailable["SPICE"] == reason and "SPICE" not in summary


def test_ptb_tokenize_keeps_alignment() -> None:
    caps = {i: [f"caption {i}, number {i}!", "x\u2028y"] for i in range(30)}
    out = ptb_tokenize(caps)
    assert out[7] == ["caption 7 number 7", "x y"]
    assert list(out) == list(caps)


def test_cider_requires_matching_keys() -> None:
    with pytest.raises(ValueError, match="keys differ"):
        CocoCider().compute_score({"A": ["a"]}, {"B": ["a"]})
    with pytest.raises(ValueError, match="exactly one"):
        CocoCider().compute_score({"A": ["a"]}, {"A": ["a", "b"]})


def test_identical_beats_shuffled_on_demo_world(demo_world) -> None:
    from captionlab.data.captions import load_captions

    ann = load_captions(demo_world / "p2_data" / "val.json")
    stems = ann.stems
    own = {s: ann.captions[s][0] for s in stems}
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(stems))
    perm = np.where(perm == np.arange(len(stems)), (perm + 1) % len(stems), perm)  # no image keeps its own caption
    shuffled = {s: ann.captions[stems[j]][0] for s, j in zip(stems, perm)}
    refs = {s: ann.captions[s] for s in stems}
    good, good_per, _ = ngram_scores(refs, own, ("CIDEr",))
    bad, bad_per, _ = ngram_scores(refs, shuffled, ("CIDEr",))
    assert good["CIDEr"] > bad["CIDEr"] + 1.0
    assert (good_per["cider"] > bad_per["cider"]).mean() > 0.9
