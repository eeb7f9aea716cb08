"""Attention analysis: word-by-word maps over image patches for the PEFT captioner and LLaVA.

    from captionlab.attention import capture_captioner, capture_llava, attention_series, save_series, layer_report

    results = capture_captioner(captioner, ["bike.jpg"], layer=-1, heads="mean")   # or capture_llava(llava, ..., prompt)
    attention_series(results[0])                 # the image, then one overlay per word
    save_series(results[0], "reports/attention")  # -> reports/attention/bike.png
    layer_report(captioner, *load_annotated(images_dir, masks_dir, objects_json))  # pointing game per layer
    exp = explain(captioner, "bike.jpg", "a red bike", method="relevancy", layer=-1)  # any caption, teacher-forced
    method_report(model, *load_annotated(...))     # pointing / mass / deletion per method x layer
    word_slider(exp)                               # self-contained HTML slider (works in the saved report)
"""

from captionlab.attention.capture import (AttentionResult, capture, capture_captioner, capture_captioner_layers,
                                          capture_layers, capture_llava, capture_llava_layers, merge_words,
                                          num_heads, num_layers)
from captionlab.attention.explain import METHODS, Explanation, caption_logprobs, explain, explain_all, generate_ids
from captionlab.attention.faithfulness import (best_row, layer_report, load_annotated, method_report, score_map,
                                               summarize, word_table)
from captionlab.attention.figures import attention_series, save_series, top_last_pairs
from captionlab.attention.widgets import (ExplanationCache, ResultCache, attention_browser, cache_for, save_frames,
                                         word_slider)

__all__ = ["AttentionResult", "capture", "capture_captioner", "capture_captioner_layers", "capture_layers",
           "capture_llava", "capture_llava_layers", "merge_words", "num_heads", "num_layers", "layer_report",
           "load_annotated", "score_map", "summarize", "word_table", "attention_series", "save_series",
           "top_last_pairs", "ResultCache", "attention_browser", "cache_for", "save_frames", "METHODS", "Explanation",
           "caption_logprobs", "explain", "explain_all", "generate_ids", "best_row", "method_report",
           "ExplanationCache", "word_slider"]
