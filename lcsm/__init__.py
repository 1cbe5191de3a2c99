"""lcsm: linear-complexity sequence models as Expand, Oscillation, Shrink."""

__version__ = "0.1.0"
