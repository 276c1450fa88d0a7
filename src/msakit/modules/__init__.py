"""Blocks shared by two or more models."""

from msakit.modules.pooling import masked_max, masked_mean

__all__ = ["masked_max", "masked_mean"]
