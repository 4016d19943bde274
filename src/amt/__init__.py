"""amt: robust few-shot image classification with vision transformers (AMT, NeurIPS 2024)."""

__version__ = "0.1.0"
