"""msakit: multimodal sentiment analysis with faithful models and honest evaluation."""

__version__ = "0.1.0"
