"""salmon: principle-following reward models as a live service (SALMON, Sun et al. 2023)."""

__version__ = "0.1.0"
