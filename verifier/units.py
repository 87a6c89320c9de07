"""Byte counts and byte rates, one rule everywhere (--max-bandwidth, --parameter, matrix keys).

The rule: a plain number is bytes; k, M, G, T are decimal (10^3, 10^6, 10^9, 10^12) and Ki, Mi,
Gi, Ti binary (2^10 ... 2^40), letters in either case; a trailing B, and /s for a rate, may
follow. "50M" is 50,000,000 and "64Mi" is 67,108,864. Fractions are allowed where they come out
whole ("1.5Mi"); the result is a positive integer.
"""

from __future__ import annotations

import re

from verifier.errors import InputError

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?", re.I)
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?(?:/s)?", re.I)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
EXAMPLES = "e.g. 50000000, 50M (10^6), 48Mi (2^20)"


def looks_like_size(text: str) -> bool:
    """True when `text` is a number with a unit (so --parameter NAME=64Mi is a byte count)."""
    return _SIZE.fullmatch(text.strip()) is not None and not text.strip().isdigit()


def parse_bytes(value, what: str = "a byte count", rate: bool = False) -> int:
    """`value` (int or text by the module's rule) as a positive number of bytes; InputError otherwise."""
    if isinstance(value, bool):
        raise InputError(f"{value!r} is not {what} ({EXAMPLES})")
    if isinstance(value, int):
        n = value
    else:
        m = (_RATE if rate else _SIZE).fullmatch(str(value).strip())
        if not m:
            raise InputError(f"{value!r} is not {what} ({EXAMPLES})")
        exact = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
        if exact != int(exact):
            raise InputError(f"{value!r} is not a whole number of bytes")
        n = int(exact)
    if n <= 0:
        raise InputError(f"{value!r} must be greater than 0")
    return n


def parse_rate(value) -> int:
    """Bytes per second by the same rule ("/s" may follow)."""
    return parse_bytes(value, "a byte rate", rate=True)
