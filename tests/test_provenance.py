"""The page ledger and the provenance classes on synthesised pages with real dirtyram headers.
(The classes from real migrations are pinned in tests/test_stream_tap.py.)"""

from __future__ import annotations

import pytest

from verifier.analysis.pageheader import encode
from verifier.analysis.provenance import (BYTES_PER_PAGE, CORRUPT_IN_STREAM, DESTINATION_DIVERGED,
                                          LOST_ON_DESTINATION, NEVER_SENT, NOT_RESENT, PageLedger, classify,
                                          provenance_line)

PAGE = 4096
BLOCK = "mach-virt.ram"


def page(gen: int, index: int = 5, instance: int = 77, body: bytes = b"") -> bytes:
    head = encode(instance, index, 64, gen, gen * 64 + index)
    return (head + body).ljust(PAGE, b"\0")


def _ledger():
    return PageLedger(BLOCK, 64)


def test_sixteen_bytes_a_page():
    led = PageLedger(BLOCK, 1 << 16)
    assert BYTES_PER_PAGE == 16 and led.nbytes == 16 << 16


def test_never_sent():
    p = classify(_ledger(), 5, page(3), bytes(PAGE))
    assert p.cls == NEVER_SENT and p.entry is None and p.src_gen == 3


def test_sent_right_lost_on_the_destination():
    led = _ledger()
    led.record(BLOCK, 5 * PAGE, "page", "main", 1234, 4, page(9))
    p = classify(led, 5, page(9), page(8))
    assert p.cls == LOST_ON_DESTINATION and p.entry.stream_offset == 1234 and p.entry.iteration == 4


def test_not_resent_after_a_write_names_both_generations():
    led = _ledger()
    led.record(BLOCK, 5 * PAGE, "page", "main", 99, 1, page(2))
    led.record(BLOCK, 5 * PAGE, "page", "multifd-2", 777, 3, page(41))
    p = classify(led, 5, page(44), page(41))
    assert p.cls == NOT_RESENT and (p.sent_gen, p.src_gen) == (41, 44)
    assert p.entry.channel == "multifd-2" and p.entry.stream_offset == 777
    line = provenance_line(p, iterations=6)
    assert line.startswith("not re-sent after a write")
    assert "last sent in iteration 3 of 6 on channel multifd-2, gen 41; source gen 44" in line


@pytest.mark.parametrize("sent, note", [
    (page(41, body=b"\x01"), "body not zero"),
    (page(41, index=6), "header names another page"),
    (page(50), "newer than the source"),
])
def test_content_the_source_never_had(sent, note):
    led = _ledger()
    led.record(BLOCK, 5 * PAGE, "xbzrle", "main", 10, 2, sent)
    p = classify(led, 5, page(44), sent)
    assert p.cls == CORRUPT_IN_STREAM and note in p.note
    assert "as a xbzrle record" in provenance_line(p, 3)


def test_destination_holds_something_else():
    led = _ledger()
    led.record(BLOCK, 5 * PAGE, "page", "main", 10, 2, page(41))
    assert classify(led, 5, page(44), page(40)).cls == DESTINATION_DIVERGED


def test_zero_records_and_other_blocks():
    led = _ledger()
    led.record(BLOCK, 7 * PAGE, "zero", "main", 50, 0, None)
    led.record("vexpress.flash0", 0, "page", "main", 60, 0, bytes(PAGE))
    p = classify(led, 7, page(1, index=7), bytes(PAGE))  # sent as zero, the source wrote it later
    assert p.cls == NOT_RESENT and p.entry.kind == "zero" and p.sent_gen is None
    assert led.summary()["other_blocks"] == {"vexpress.flash0": 1}
    with pytest.raises(ValueError, match="beyond its 64 pages"):
        led.record(BLOCK, 64 * PAGE, "page", "main", 0, 0, bytes(PAGE))


def test_one_kib_records_classify_the_part_that_differs():
    """vexpress-a15 streams carry 1 KiB target pages: four records make one 4 KiB image page."""
    led = PageLedger(BLOCK, 256, page_size=1024)
    src = page(44)
    for k in range(4):
        led.record(BLOCK, 5 * PAGE + k * 1024, "page", "main", 100 + k, 2, src[k * 1024:(k + 1) * 1024])
    flipped = bytearray(src)
    flipped[3000] ^= 0xFF  # a byte of the third KiB, lost on the destination
    p = classify(led, 5, src, bytes(flipped))
    assert p.cls == LOST_ON_DESTINATION and p.entry.stream_offset == 102 and "bytes 0x800-0xbff" in p.note
    led.record(BLOCK, 5 * PAGE + 2048, "page", "main", 500, 3, bytes(flipped[2048:3072]))  # sent corrupt
    p = classify(led, 5, src, bytes(flipped))
    assert p.cls == CORRUPT_IN_STREAM and p.note.endswith("body not zero")
