"""Data layer: robust image loading, course-layout caption files, predictions, zero-shot CSVs, the demo world."""

from captionlab.data.captions import (
    CaptionSet,
    check_prediction_keys,
    load_captions,
    load_id2label,
    load_objects,
    load_predictions,
    read_zeroshot_csv,
    save_predictions,
    write_zeroshot_csv,
)
from captionlab.data.images import IMAGE_EXTENSIONS, list_images, load_image, load_mask, to_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "CaptionSet",
    "check_prediction_keys",
    "list_images",
    "load_captions",
    "load_id2label",
    "load_image",
    "load_mask",
    "load_objects",
    "load_predictions",
    "read_zeroshot_csv",
    "save_predictions",
    "to_rgb",
    "write_zeroshot_csv",
]
