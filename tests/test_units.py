"""One byte-size rule: decimal k/M/G/T, binary Ki/Mi/Gi/Ti, the same for every option and key."""

from __future__ import annotations

import pytest

from verifier.errors import InputError
from verifier.matrix.spec import parse_rate as matrix_rate
from verifier.run.options import BY_NAME, KeyValues
from verifier.units import looks_like_size, parse_bytes, parse_rate


def _key_values(items, flag, booleans):
    """--capability/--parameter values as the option table parses them."""
    return dict(KeyValues(booleans).parse(i, flag) for i in items)


@pytest.mark.parametrize("text, n", [
    ("4096", 4096), ("50M", 50_000_000), ("50m", 50_000_000), ("64Mi", 64 << 20), ("64mi", 64 << 20),
    ("1k", 1000), ("1Ki", 1024), ("2G", 2 * 10**9), ("2Gi", 2 << 30), ("1T", 10**12), ("1Ti", 1 << 40),
    ("1.5Mi", 3 << 19), ("1.5M", 1_500_000), ("16MiB", 16 << 20), (" 8 M ", 8_000_000), (123, 123),
])
def test_sizes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "M", "fast", "-5", "0", "0M", "1.5", "5X", "5 MiB/s", True])
def test_not_sizes(text):
    with pytest.raises(InputError):
        parse_bytes(text)


def test_rates_take_a_per_second_suffix():
    assert parse_rate("50MB/s") == 50_000_000
    assert parse_rate("48Mi/s") == 48 << 20


def test_every_surface_uses_the_same_rule():
    """--max-bandwidth, the matrix key and --parameter values agree: 64M is 10^6-based everywhere."""
    from dirtylog.cli import TableValue
    assert TableValue(BY_NAME["max_bandwidth"]).convert("64M", None, None) == matrix_rate("64M") == 64_000_000
    assert _key_values(["xbzrle-cache-size=64M"], "--parameter", False) == {"xbzrle-cache-size": 64_000_000}
    assert _key_values(["xbzrle-cache-size=64Mi"], "--parameter", False) == {"xbzrle-cache-size": 64 << 20}
    assert matrix_rate("auto") is None


def test_parameter_values_that_are_not_sizes_stay_as_given():
    assert _key_values(["multifd-channels=4", "compression=zstd", "x=on"], "--parameter", False) == \
        {"multifd-channels": 4, "compression": "zstd", "x": True}
    assert looks_like_size("64Mi") and not looks_like_size("4") and not looks_like_size("zstd")
