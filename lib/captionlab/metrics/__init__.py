"""Caption metrics: CIDEr and friends (`cider`), CLIPScore / RefCLIPScore (`clipscore`), `evaluate` (both)."""

from captionlab.metrics.evaluate import ALL_METRICS, DEFAULT_METRICS, EvalResult, evaluate, load_result

__all__ = ["ALL_METRICS", "DEFAULT_METRICS", "EvalResult", "evaluate", "load_result"]
