"""Shared pieces of the shaping processors."""

from samplerkit.steps import MaskProcessor

__all__ = ["MaskProcessor"]
