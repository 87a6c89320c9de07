"""verifier.analysis.pageheader and verifier.analysis.diagnosis on synthesised images with real header bytes.

The generator below replays dirtyram's main loop literally (pass 0, then strided passes), so
it is independent of the closed-form write-order model in verifier.analysis.pageheader.
"""

import json
import random
import struct

import pytest

from verifier.analysis import pageheader
from verifier.analysis.compare import compare_images
from verifier.analysis.diagnosis import (DUPLICATE, IMPOSSIBLE, LOST_WRITE, MISSING, NEVER_SENT, NOT_DIRTYRAM, STALE, TORN, TORN_ELSEWHERE, classify_page, group_diagnoses, analyse, destination_invariant, diagnose, render_text)
from verifier.errors import CaptureError

PS = 4096
FLAGS = 1 << 8


# --- generator ------------------------------------------------------------------------------

def replay(total, dirty, writes):
    """page_index -> (generation, write_seq) after the instance's first `writes` writes,
    following dirtyram.c's loops exactly."""
    state, seq = {}, 0
    for p in range(total):
        if seq == writes:
            return state
        state[p] = (0, seq)
        seq += 1
    stride = total // dirty
    g = 1
    while True:
        start = (g - 1) % stride
        for k in range(dirty):
            if seq == writes:
                return state
            state[start + k * stride] = (g, seq)
            seq += 1
        g += 1


def next_write(total, dirty, writes):
    """(page_index, generation) of write number `writes` (the one after the last)."""
    before, after = replay(total, dirty, writes), replay(total, dirty, writes + 1)
    (p,) = [p for p in after if after[p] != before.get(p)]
    return p, after[p][0]


def header(iid, idx, total, gen, seq, flags=FLAGS):
    body = struct.pack("<IIIIQQI", 0x47504C44, iid, idx, total, gen, seq, flags)
    h = 0x811C9DC5
    for b in body:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return body + struct.pack("<I", h)


def torn_header(new, old, words):
    """The first `words` u32 words of `new` stored over `old` (a write stopped midway)."""
    return new[:4 * words] + old[4 * words:]


class Image:
    def __init__(self, pages, kernel_pages=(), seed=7):
        self.buf = bytearray(pages * PS)
        rnd = random.Random(seed)
        for p in kernel_pages:  # non-dirtyram data
            self.buf[p * PS:(p + 1) * PS] = rnd.randbytes(PS)

    def put_header(self, image_page, hdr):
        self.buf[image_page * PS:image_page * PS + 40] = hdr

    def put_instance(self, iid, total, dirty, writes, placement):
        """Stamp the state after `writes` writes; page_index i lives at image page
        placement[i]. Returns the state."""
        state = replay(total, dirty, writes)
        for idx, (gen, seq) in state.items():
            self.put_header(placement[idx], header(iid, idx, total, gen, seq))
        return state

    def save(self, path):
        path.write_bytes(self.buf)
        return path


BASE = 0x80000000
TOTAL, DIRTY = 64, 16          # stride 4
W_SRC = 64 + 16 * 5 + 7        # mid-way through pass 6
PLACE = [100 + i for i in range(TOTAL)]   # instance 2 at image pages 100..163


def source_image():
    img = Image(256, kernel_pages=range(10, 20))
    state = img.put_instance(2, TOTAL, DIRTY, W_SRC, PLACE)
    return img, state


# --- pageheader -----------------------------------------------------------------------------

def test_header_decodes_with_valid_checksum_and_torn_when_checksum_is_wrong():
    raw = header(5, 17, 64, 3, 99, flags=FLAGS | pageheader.FLAG_THP)
    assert raw == pageheader.encode(5, 17, 64, 3, 99, FLAGS | pageheader.FLAG_THP)
    h = pageheader.decode(raw + bytes(PS - 40))
    assert (h.instance_id, h.page_index, h.total_pages, h.generation, h.write_seq) == \
        (5, 17, 64, 3, 99)
    assert h.valid and not h.torn and h.thp and not h.hugetlb and h.version == 1
    bad = bytearray(raw)
    bad[38] ^= 1
    t = pageheader.decode(bytes(bad))
    assert t.torn and not t.valid
    assert pageheader.decode(bytes(PS)) is None
    assert pageheader.decode(b"DLPG") is None


@pytest.mark.parametrize("total,dirty", [(1, 1), (7, 2), (10, 3), (16, 16), (33, 5), (64, 16)])
def test_write_order_model_matches_a_literal_replay(total, dirty):
    for w in range(total * 5):
        state = replay(total, dirty, w + 1)
        for p in range(total):
            assert pageheader.last_write(p, w, total, dirty) == state.get(p)
        p, g = pageheader.write_at(w, total, dirty)
        assert state[p] == (g, w)
        obs = [(p,) + v for p, v in state.items()]
        d = pageheader.infer_dirty(total, obs)
        if d is not None:  # any inferred count predicts the same state
            assert {p: pageheader.last_write(p, w, total, d) for p in range(total)} == \
                {p: state.get(p) for p in range(total)}


def test_scan_instances_finds_every_instance_page_and_skips_kernel_data(tmp_path):
    img, _ = source_image()
    img.put_instance(9, 8, 2, 8 + 2 * 3, [200 + 2 * i for i in range(8)])
    # magic at an unaligned place in a kernel page must not count
    img.buf[12 * PS + 100:12 * PS + 104] = b"DLPG"
    scan = pageheader.scan_instances(img.save(tmp_path / "i.img"), chunk_size=16 * PS)
    assert sorted(scan.instances) == [2, 9]
    i2 = scan.instances[2]
    assert (i2.total_pages, i2.pages_found, i2.max_write_seq, i2.max_generation) == \
        (64, 64, W_SRC - 1, 6)
    assert i2.image_pages()[5] == [105]
    assert scan.instances[9].image_pages()[3] == [206]
    assert scan.magic_pages == 64 + 8 and not scan.torn


def test_scan_instances_reads_a_partial_last_page(tmp_path):
    img = Image(3)
    img.put_header(2, header(1, 0, 1, 0, 0))
    path = tmp_path / "p.img"
    path.write_bytes(bytes(img.buf[:2 * PS + 50]))
    scan = pageheader.scan_instances(path)
    assert scan.instances[1].image_pages() == {0: [2]}


# --- classification of differing pages -------------------------------------------------------

def diagnosed(tmp_path, src_img, dst_img, **kw):
    r = compare_images(src_img.save(tmp_path / "src.img"), dst_img.save(tmp_path / "dst.img"))
    return r, analyse(r, **kw)


def test_destination_stale_page_is_reported_with_its_address(tmp_path):
    src, _ = source_image()
    dst = Image(256, kernel_pages=range(10, 20))
    dst.buf[:] = src.buf
    # instance pages 20-22 hold the write before their last one on the destination
    for idx in (20, 21, 22):
        st = replay(TOTAL, DIRTY, W_SRC)
        gen, seq = st[idx]
        old = replay(TOTAL, DIRTY, seq)[idx]  # the write before that one
        dst.put_header(PLACE[idx], header(2, idx, TOTAL, *old))
    r, rep = diagnosed(tmp_path, src, dst)
    assert list(r.diff_pages) == [120, 121, 122]
    assert rep.counts[STALE] == 3 and not rep.impossible
    (rng,) = rep.ranges
    assert (rng.kind, rng.instance_id, rng.first_index, rng.last_index) == (STALE, 2, 20, 22)
    assert (rng.phys_start, rng.phys_end) == (0x80078000, 0x8007AFFF)
    # stride 4: pages 20, 21 last written in passes 5, 6 (before: 1, 2); page 22 in pass 3
    # (before: pass 0)
    assert (rng.lag_min, rng.lag_max) == (3, 4)
    assert (rng.dst_gen_min, rng.dst_gen_max, rng.src_gen_min, rng.src_gen_max) == (0, 2, 3, 6)
    text = render_text(rep)
    assert "0x80078000-0x8007afff  3 pages  stale  instance 2 pages 20-22" in text
    assert "dst gen 0..2 < src gen 3..6 (lag 3..4" in text
    d = rep.to_dict()
    assert d["counts"][STALE] == 3
    (j,) = diagnose(r)
    assert (j["diagnosis"], j["start"], j["end"], j["pages"]) == \
        (STALE, "0x80078000", "0x8007afff", 3)
    assert j["text"].startswith("0x80078000-0x8007afff  3 pages  stale")
    json.dumps(d)


def test_pages_mapped_in_descending_order_group_into_one_range():
    """The guest allocator often hands out a buffer's frames downwards (seen on QEMU 7.2: image
    pages 0x41597000.. held instance pages 63, 62, ...): one range, not one line per page."""
    def page(idx, gen, seq):
        return header(1, idx, 64, gen, seq) + bytes(PS - 40)
    diags = [classify_page(page(63 - k, 105, 500 + k), page(63 - k, 104, 436 + k), image_page=10 + k)
             for k in range(5)]
    diags.append(classify_page(page(40, 105, 600), page(40, 104, 536), image_page=15))  # index jumps
    diags.append(classify_page(page(41, 105, 601), page(41, 104, 537), image_page=16))  # then ascends
    r1, r2 = group_diagnoses(diags, base=0x41000000)
    assert (r1.kind, r1.pages, r1.first_index, r1.last_index, r1.index_step) == (STALE, 5, 63, 59, -1)
    assert "5 pages  stale  instance 1 pages 59-63 (descending in memory)" in r1.render()
    assert (r2.pages, r2.first_index, r2.last_index, r2.index_step) == (2, 40, 41, 1)
    assert "instance 1 pages 40-41  dst gen 104" in r2.render()


def test_zero_destination_page_is_never_sent(tmp_path):
    src, _ = source_image()
    dst = Image(256)
    dst.buf[:] = src.buf
    dst.buf[130 * PS:131 * PS] = bytes(PS)
    dst.buf[15 * PS:16 * PS] = bytes(PS)   # a kernel page too
    _, rep = diagnosed(tmp_path, src, dst)
    assert [(x.kind, x.first_page, x.instance_id) for x in rep.ranges] == \
        [(NEVER_SENT, 15, None), (NEVER_SENT, 130, 2)]


def test_destination_newer_than_source_is_impossible_and_a_capture_error(tmp_path):
    src, state = source_image()
    dst = Image(256)
    dst.buf[:] = src.buf
    gen, seq = state[7]
    dst.put_header(PLACE[7], header(2, 7, TOTAL, gen + 4, seq + 4 * DIRTY))
    _, rep = diagnosed(tmp_path, src, dst)
    assert rep.impossible and rep.counts[IMPOSSIBLE] == 1
    assert rep.ranges[0].lag_min == -4
    with pytest.raises(CaptureError, match="newer dirtyram writes than the source"):
        rep.raise_for_capture()


def test_torn_header_is_reported_as_torn(tmp_path):
    src, state = source_image()
    dst = Image(256)
    dst.buf[:] = src.buf
    gen, seq = state[9]
    new = header(2, 9, TOTAL, gen + 1, W_SRC)
    dst.put_header(PLACE[9], torn_header(new, header(2, 9, TOTAL, gen, seq), 5))
    _, rep = diagnosed(tmp_path, src, dst)
    (rng,) = rep.ranges
    assert rng.kind == TORN and rng.first.torn_side == "dst" and rng.instance_id == 2
    assert "torn header on dst" in render_text(rep)


def test_kernel_data_difference_shows_offset_and_bytes(tmp_path):
    src, _ = source_image()
    dst = Image(256)
    dst.buf[:] = src.buf
    dst.buf[11 * PS + 1000] ^= 0xFF
    _, rep = diagnosed(tmp_path, src, dst)
    (rng,) = rep.ranges
    assert rng.kind == NOT_DIRTYRAM and rng.first.first_diff == 1000
    assert rng.first.src_hex == bytes(src.buf[11 * PS + 1000:11 * PS + 1016]).hex()
    assert rng.first.dst_hex == bytes(dst.buf[11 * PS + 1000:11 * PS + 1016]).hex()
    assert "first diff at +0x3e8" in render_text(rep)


def test_classify_page_same_header_different_body_is_not_dirtyram():
    a = header(1, 0, 4, 0, 0) + bytes(PS - 40)
    b = bytearray(a)
    b[2000] = 1
    d = classify_page(a, bytes(b))
    assert d.kind == NOT_DIRTYRAM and d.first_diff == 2000


def test_diagnosis_limit_counts_the_rest_as_undiagnosed(tmp_path):
    src = Image(64, kernel_pages=range(64), seed=1)
    dst = Image(64, kernel_pages=range(64), seed=2)
    _, rep = diagnosed(tmp_path, src, dst, limit=10)
    assert rep.diff_count == 64 and rep.undiagnosed == 54
    assert sum(rep.counts.values()) == 10
    assert "54 not diagnosed" in render_text(rep)


def test_identical_images_render_as_identical(tmp_path):
    src, _ = source_image()
    _, rep = diagnosed(tmp_path, src, src)
    assert rep.ranges == [] and render_text(rep) == "images are identical"


# --- destination-only invariant --------------------------------------------------------------

def destination(writes=W_SRC, total=TOTAL, dirty=DIRTY):
    img = Image(256, kernel_pages=range(10, 20))
    state = img.put_instance(2, total, dirty, writes, PLACE)
    return img, state


def test_consistent_destination_has_no_findings(tmp_path):
    img, _ = destination()
    assert destination_invariant(img.save(tmp_path / "d.img")) == []


@pytest.mark.parametrize("writes", [1, 30, TOTAL, TOTAL + 1, TOTAL + 5, TOTAL + DIRTY * 9 + 3])
def test_destination_at_any_point_of_the_write_order_is_consistent(tmp_path, writes):
    img, _ = destination(writes)
    assert destination_invariant(img.save(tmp_path / "d.img")) == []


def test_lost_write_on_destination_is_reported_with_expected_generation(tmp_path):
    img, state = destination()
    gen, seq = state[33]
    old = replay(TOTAL, DIRTY, seq)[33]
    img.put_header(PLACE[33], header(2, 33, TOTAL, *old))
    (f,) = destination_invariant(img.save(tmp_path / "d.img"))
    assert (f.kind, f.instance_id, f.page_index, f.image_page) == (LOST_WRITE, 2, 33, 133)
    assert (f.expected_generation, f.found_generation) == (gen, old[0])
    assert f.phys_addr == BASE + 133 * PS and f.severity == "error"
    assert "lost-write" in json.loads(json.dumps(f.to_dict()))["text"]


def test_lost_write_is_caught_with_the_dirty_count_given(tmp_path):
    img, state = destination()
    old = replay(TOTAL, DIRTY, state[1][1])[1]
    img.put_header(PLACE[1], header(2, 1, TOTAL, *old))
    path = img.save(tmp_path / "d.img")
    assert [f.page_index for f in destination_invariant(path, dirty=DIRTY)] == [1]
    assert [f.page_index for f in destination_invariant(path, dirty={2: DIRTY})] == [1]


@pytest.mark.parametrize("words", range(1, 10))
def test_torn_header_at_the_write_front_is_accepted(tmp_path, words):
    img, state = destination()
    idx, gen = next_write(TOTAL, DIRTY, W_SRC)
    new = header(2, idx, TOTAL, gen, W_SRC)
    img.put_header(PLACE[idx], torn_header(new, header(2, idx, TOTAL, *state[idx]), words))
    assert destination_invariant(img.save(tmp_path / "d.img")) == []


@pytest.mark.parametrize("words", [1, 2, 5])
def test_torn_header_at_the_front_of_pass_0_is_accepted(tmp_path, words):
    img, _ = destination(writes=30)
    new = header(2, 30, TOTAL, 0, 30)
    img.put_header(PLACE[30], torn_header(new, bytes(40), words))
    assert destination_invariant(img.save(tmp_path / "d.img")) == []


def test_torn_header_away_from_the_write_front_is_reported(tmp_path):
    img, state = destination()
    idx, gen = next_write(TOTAL, DIRTY, W_SRC)
    other = (idx + 1) % TOTAL
    new = header(2, other, TOTAL, state[other][0] + 1, W_SRC)
    img.put_header(PLACE[other], torn_header(new, header(2, other, TOTAL, *state[other]), 6))
    kinds = sorted(f.kind for f in destination_invariant(img.save(tmp_path / "d.img")))
    assert kinds == [MISSING, TORN_ELSEWHERE]


def test_missing_instance_page_is_reported(tmp_path):
    img, _ = destination()
    img.put_header(PLACE[40], bytes(40))
    (f,) = destination_invariant(img.save(tmp_path / "d.img"))
    assert (f.kind, f.page_index, f.image_page) == (MISSING, 40, None)


def test_stale_copy_in_a_freed_frame_is_only_a_warning(tmp_path):
    img, state = destination()
    old = replay(TOTAL, DIRTY, state[12][1])[12]
    img.put_header(230, header(2, 12, TOTAL, *old))
    (f,) = destination_invariant(img.save(tmp_path / "d.img"))
    assert (f.kind, f.severity, f.image_page) == (DUPLICATE, "warning", 230)


def test_two_instances_with_different_dirty_counts_are_checked_separately(tmp_path):
    img = Image(512)
    img.put_instance(1, 50, 7, 50 + 7 * 11 + 2, list(range(0, 50)))
    st = img.put_instance(3, 120, 120, 120 * 3 + 17, list(range(200, 320)))
    path = img.save(tmp_path / "d.img")
    assert destination_invariant(path) == []
    old = replay(120, 120, st[5][1])[5]
    img.put_header(205, header(3, 5, 120, *old))
    (f,) = destination_invariant(img.save(path))
    assert (f.kind, f.instance_id, f.page_index) == (LOST_WRITE, 3, 5)
