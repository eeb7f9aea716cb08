"""captionlab: a notebook report workbook for vision-language captioning research."""

__version__ = "0.1.0"
