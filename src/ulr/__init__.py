"""ulr: train neural networks without backpropagation (Unified Likelihood Ratio)."""

__version__ = "0.1.0"
