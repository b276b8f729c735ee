"""infinitrain: train and run Infini-attention language models (arXiv 2404.07143) on DeepSpeed."""

__version__ = "0.1.0"
