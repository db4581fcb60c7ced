"""Istio duration strings (`1.5s`, `100ms`, `2m`, `1h30m`) to whole milliseconds.

Istio accepts Go-style durations in its YAML. Compiled config carries integer
milliseconds, where 0 means "no timeout", so a positive duration shorter than a
millisecond rounds up to 1 ms rather than silently disabling the timeout.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

# milliseconds per unit, as exact decimals so "1.1s" is 1100 and not 1100.0000000000002
_MS_PER_UNIT = {
    "ns": Decimal("0.000001"),
    "us": Decimal("0.001"),
    "µs": Decimal("0.001"),  # Go accepts the micro sign
    "μs": Decimal("0.001"),  # and the Greek mu
    "ms": Decimal(1),
    "s": Decimal(1000),
    "m": Decimal(60_000),
    "h": Decimal(3_600_000),
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_FORMAT_HINT = "a duration such as 1.5s, 100ms or 2m"
# protobuf Duration's range (10,000 years), which Istio inherits; it also keeps the
# compiled value within MessagePack's 64-bit integers
MAX_DURATION_MS = 315_576_000_000 * 1000


def parse_duration_ms(text: str) -> int:
    """Milliseconds in `text`, rounded up; raises ValueError naming the expected format."""
    return math.ceil(parse_duration_exact_ms(text))


def parse_duration_exact_ms(text: str) -> Decimal:
    """Milliseconds in `text`, exactly (`1.5ms` is 1.5), for checks that need precision."""
    if text == "0":
        return Decimal(0)
    if not text:
        raise ValueError(f"must be {_FORMAT_HINT}, got an empty string")
    if text.startswith("-"):
        raise ValueError(f"must not be negative, got {text!r}")
    total = Decimal(0)
    pos = 0
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None:
            raise ValueError(f"must be {_FORMAT_HINT}, got {text!r}")
        total += Decimal(m.group(1)) * _MS_PER_UNIT[m.group(2)]
        pos = m.end()
    if total > MAX_DURATION_MS:
        raise ValueError(f"must be at most 315576000000s (10000 years), got {text!r}")
    return total
