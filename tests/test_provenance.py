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


# -- which dirty-bitmap sync each iteration was sent under --------------------------------------
# Pure-function tests of the bracketing arithmetic on explicit observations (times in seconds, made
# up here: no QEMU is imitated). The real case is pinned by tests/test_e2e.py
# test_multithreaded_tcg_with_limited_bandwidth_is_reported_as_stale_pages.

from verifier.analysis.provenance import (SyncObservations, read_sync_observations, sync_in_effect,  # noqa: E402
                                          sync_table)


def _events(*times):
    return SyncObservations(events=[(t, k) for k, t in enumerate(times, 1)], final=len(times))


def test_events_place_a_section_read_while_written_exactly():
    obs = _events(1.0, 2.0, 3.0)
    assert sync_in_effect(1.5, obs) == (1, 1)
    assert sync_in_effect(2.0001, obs) == (2, 2)
    assert sync_in_effect(9.0, obs) == (3, 3)


def test_a_section_that_may_have_been_written_before_the_tap_read_it_gets_a_range():
    obs = _events(1.0, 2.0, 3.0)
    assert sync_in_effect(2.5, obs, t_early=1.5) == (1, 2)  # sync 2 fell between: "pass 1-2"
    assert sync_in_effect(2.5, obs, t_early=2.1) == (2, 2)


def test_polls_bracket_when_there_are_no_events():
    # (sent, answered, dirty-sync-count): the count went from 2 to 3 between the polls at 1.0 and 1.1
    obs = SyncObservations(polls=[(0.9, 0.91, 2), (1.0, 1.01, 2), (1.1, 1.11, 3), (1.2, 1.21, 3)], final=3)
    assert sync_in_effect(1.05, obs) == (2, 3)
    assert sync_in_effect(1.005, obs) == (2, 3)  # within a query: not answered before, not sent after
    assert sync_in_effect(1.15, obs) == (3, 3)
    assert sync_in_effect(0.95, obs) == (2, 2)


def test_the_table_is_per_iteration_and_says_its_basis():
    obs = _events(1.0, 2.0, 3.0)
    groups = [{"channel": "main", "iteration": 0, "records": 10, "first": 1.1, "last": 1.9, "before": 1.05,
               "during": 1.5},
              {"channel": "main", "iteration": 1, "records": 2, "first": 2.2, "last": 2.2, "before": 1.9,
               "during": 1.95},  # read only after it was written: sync 2 may be before or after it
              {"channel": "multifd-0", "iteration": 0, "records": 5, "first": 1.2, "last": 2.5, "before": 1.1,
               "during": 2.4}]
    t = sync_table(groups, obs, rounds=("multifd-0",))
    assert t["basis"] == "MIGRATION_PASS events" and t["dirty_sync_count"] == 3
    rows = {(r["channel"], r["iteration"]): r for r in t["iterations"]}
    assert rows["main", 0]["sync"] == [1, 1] and rows["main", 0]["how"] == "read while written"
    assert rows["main", 1]["sync"] == [1, 2]
    assert rows["multifd-0", 0]["sync"] == [1, 2]  # a 10.0 round spans sync 2
    assert t["ambiguous"] == 2


def test_the_line_names_the_pass_and_the_sync_after_which_the_write_happened():
    led = _ledger()
    led.record(BLOCK, 5 * PAGE, "page", "main", 99, 3, page(41))
    p = classify(led, 5, page(44), page(41))
    p.sync = (4, 4)
    line = provenance_line(p, iterations=6, syncs=6)
    assert "last sent in iteration 3 of 6 (pass 4 of 6) on channel main, gen 41; source gen 44 " \
           "written after sync 4 and not sent again" in line
    p.sync = (3, 4)
    assert "(pass 3-4 of 6)" in provenance_line(p, 6, 6) and "after sync 3-4" in provenance_line(p, 6, 6)


def test_timeline_without_events_or_wall_times_gives_no_observations(tmp_path):
    path = tmp_path / "timeline.jsonl"
    path.write_text('{"t": 0.1, "status": "active", "ram": {"dirty-sync-count": 1}}\n')
    obs = read_sync_observations(path)
    assert obs.final == 1 and not obs.events and not obs.polls
    assert sync_in_effect(1.0, obs) is None
