"""Caption n-gram metrics as the course grades them: pycocoevalcap's PTBTokenizer (Java) then Cider (IDF over the
evaluated set), plus BLEU-1..4, METEOR, ROUGE-L and SPICE where they run (SPICE needs a download: reported
unavailable offline, never a crash)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captionlab.errors import ConfigError
from captionlab.utils import captured_stderr_fd

NGRAM_METRICS: tuple[str, ...] = ("CIDEr", "BLEU", "METEOR", "ROUGE_L", "SPICE")


def java_available() -> bool:
    """Whether a `java` executable is on PATH (PTBTokenizer, METEOR and SPICE need it)."""
    return shutil.which("java") is not None


def _clean(text: str) -> str:
    # PTBTokenizer reads one sentence per line: any line-breaking character would shift every later caption.
    return " ".join(text.split())


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """Tokenize {key: [caption, ...]} with pycocoevalcap's PTBTokenizer (lower-case, punctuation removed)."""
    if not java_available():
        raise ConfigError("CIDEr (as the course grades it) tokenizes with Stanford PTBTokenizer, which needs `java`: "
                          "install a JRE (Debian: apt-get install default-jre-headless)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    wrapped = {k: [{"caption": _clean(c)} for c in caps] for k, caps in captions.items()}
    with captured_stderr_fd():  # Java prints "PTBTokenizer tokenized N tokens at ..." on every call
        out = PTBTokenizer().tokenize(wrapped)
    for k, caps in captions.items():  # the wrapper zips lines to keys: a lost line would misalign silently
        if len(out.get(k, [])) != len(caps):
            raise RuntimeError(f"PTBTokenizer returned {len(out.get(k, []))} line(s) for {k!r}, expected {len(caps)}")
    return {k: out[k] for k in captions}


def tokenize_pair(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, str | Sequence[str]]
                  ) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
    """Tokenize references and candidates in one Java call; returns (gts, res) in `compute_score` shape."""
    res_lists = {k: [v] if isinstance(v, str) else list(v) for k, v in res.items()}
    both = ptb_tokenize({**{("g", k): v for k, v in gts.items()}, **{("r", k): v for k, v in res_lists.items()}})
    return {k: both[("g", k)] for k in gts}, {k: both[("r", k)] for k in res_lists}


class CocoCider:
    """CIDEr-D as pycocoevalcap computes it; `compute_score(gts, res)` on PTB-tokenized {key: [str]} dicts."""

    def __init__(self, n: int = 4, sigma: float = 6.0) -> None:
        self.n, self.sigma = n, sigma

    def compute_score(self, gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]]
                      ) -> tuple[float, np.ndarray]:
        """(corpus CIDEr, per-image CIDEr in `gts` key order); IDF is computed over this evaluated set."""
        from pycocoevalcap.cider.cider import Cider

        _check_shapes(gts, res)
        if len(gts) == 0:
            raise ValueError("CIDEr of an empty set is undefined")
        score, scores = Cider(n=self.n, sigma=self.sigma).compute_score(dict(gts), {k: res[k] for k in gts})
        return float(score), np.asarray(scores, dtype=np.float64)

    def method(self) -> str:
        return "CIDEr"


def _check_shapes(gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]]) -> None:
    if set(gts) != set(res):
        raise ValueError(f"gts and res keys differ: {len(set(gts) - set(res))} missing, {len(set(res) - set(gts))} extra")
    for k in gts:
        if not isinstance(res[k], list) or len(res[k]) != 1:
            raise ValueError(f"res[{k!r}] must be a list of exactly one caption")
        if not isinstance(gts[k], list) or not gts[k]:
            raise ValueError(f"gts[{k!r}] must be a non-empty list of references")


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here (None when it can): it needs java and Stanford CoreNLP 3.6.0 jars it downloads."""
    if not java_available():
        return "SPICE needs java (not found on PATH)"
    import pycocoevalcap.spice as spice_pkg

    lib = Path(spice_pkg.__file__).parent / "lib"
    missing = [j for j in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar") if not (lib / j).exists()]
    if missing:
        return (f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(missing)} in {lib}), which pycocoevalcap downloads "
                f"from nlp.stanford.edu on first use; not present (offline)")
    return None


def _bleu(gts: dict, res: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    from pycocoevalcap.bleu.bleu import Bleu

    score, scores = Bleu(4).compute_score(gts, res, verbose=0)
    return ({f"Bleu_{i + 1}": float(score[i]) for i in range(4)},
            {f"bleu_{i + 1}": np.asarray(scores[i], dtype=np.float64) for i in range(4)})


def _meteor(gts: dict, res: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, scores = scorer.compute_score(gts, res)
    finally:
        _close_meteor(scorer)
    return {"METEOR": float(score)}, {"meteor": np.asarray(scores, dtype=np.float64)}


class _ClosedProcess:
    """Stands in for Meteor's Java process once we closed it, so Meteor.__del__ has nothing left to do."""

    stdin = type("_Stdin", (), {"close": staticmethod(lambda: None)})()

    def kill(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return 0


def _close_meteor(scorer: Any) -> None:
    """Stop Meteor's Java process now (not in __del__, which deadlocks if compute_score failed holding the lock)."""
    import threading

    proc = getattr(scorer, "meteor_p", None)
    if proc is None:
        return
    try:
        proc.stdin.close()
    except Exception:
        pass
    proc.kill()
    proc.wait(timeout=10)
    scorer.meteor_p, scorer.lock = _ClosedProcess(), threading.Lock()


def _rouge(gts: dict, res: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    from pycocoevalcap.rouge.rouge import Rouge

    score, scores = Rouge().compute_score(gts, res)
    return {"ROUGE_L": float(score)}, {"rouge_l": np.asarray(scores, dtype=np.float64)}


def _spice(gts: dict, res: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    from pycocoevalcap.spice.spice import Spice

    score, scores = Spice().compute_score(gts, res)
    keys = sorted(gts)  # Spice returns per-image results in sorted key order
    by_key = dict(zip(keys, (float(s["All"]["f"]) for s in scores)))
    return {"SPICE": float(score)}, {"spice": np.asarray([by_key[k] for k in gts], dtype=np.float64)}


def _cider(gts: dict, res: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    score, scores = CocoCider().compute_score(gts, res)
    return {"CIDEr": score}, {"cider": scores}


_RUNNERS: dict[str, Callable[[dict, dict], tuple[dict[str, float], dict[str, np.ndarray]]]] = {
    "CIDEr": _cider, "BLEU": _bleu, "METEOR": _meteor, "ROUGE_L": _rouge, "SPICE": _spice}


def ngram_scores(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str],
                 metrics: Sequence[str] = ("CIDEr",)) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, str]]:
    """Tokenize once, run the requested n-gram metrics; returns (corpus scores, per-image arrays in `references`
    order, {metric: reason} for metrics that could not run)."""
    unknown = [m for m in metrics if m not in _RUNNERS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; known: {list(_RUNNERS)}")
    gts, res = tokenize_pair(references, {k: predictions[k] for k in references})
    summary: dict[str, float] = {}
    per_image: dict[str, np.ndarray] = {}
    unavailable: dict[str, str] = {}
    for name in metrics:
        if name == "SPICE" and (reason := spice_unavailable_reason()):
            unavailable[name] = reason
            continue
        try:
            s, p = _RUNNERS[name](gts, res)
        except Exception as exc:  # METEOR / SPICE are external Java programs: report, don't crash
            if name == "CIDEr":
                raise
            unavailable[name] = f"{name} failed: {type(exc).__name__}: {exc}"
            continue
        summary.update(s)
        per_image.update(p)
    return summary, per_image, unavailable
