"""Percentage draws shared by fault injection and mirroring."""

from __future__ import annotations

# Istio hands Envoy percentages as a FractionalPercent over a million
# (`uint32(value * 10000)`), so shares below 0.0001 % are 0 there too
_MILLION = 1_000_000


def percent_hit(percentage: float, rand: float) -> bool:
    """True for `percentage` % of uniform draws `rand` in [0, 1)."""
    return int(rand * _MILLION) < int(percentage * 10_000)
