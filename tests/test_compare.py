"""verifier.analysis.compare on real files written to tmp_path."""

import random

import pytest

from verifier.analysis.compare import CompareResult, compare_images, group_ranges, guest_phys_addr, read_page_pairs
from verifier.errors import InputError

PS = 4096


def write(path, data):
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def rnd():
    return random.Random(1234)


def pair(tmp_path, a, b):
    return write(tmp_path / "src.img", a), write(tmp_path / "dst.img", b)


def test_identical_images_have_no_differing_pages(tmp_path, rnd):
    data = rnd.randbytes(3 * 1024 * 1024 + 5 * PS)
    src, dst = pair(tmp_path, data, data)
    r = compare_images(src, dst)
    assert isinstance(r, CompareResult)
    assert r.identical and r.diff_count == 0 and list(r.diff_pages) == []
    assert r.image_size == len(data) and r.page_count == len(data) // PS
    assert r.bytes_compared == len(data)
    assert r.elapsed >= 0


def test_last_byte_of_last_page_differing_is_found(tmp_path, rnd):
    data = bytearray(rnd.randbytes(40 * PS))
    other = bytearray(data)
    other[-1] ^= 0xFF
    src, dst = pair(tmp_path, data, other)
    for chunk in (PS, 3 * PS, 16 << 20):
        r = compare_images(src, dst, chunk_size=chunk)
        assert list(r.diff_pages) == [39], chunk


def test_every_page_differing_is_reported(tmp_path, rnd):
    n = 600
    src, dst = pair(tmp_path, rnd.randbytes(n * PS), rnd.randbytes(n * PS))
    r = compare_images(src, dst, chunk_size=7 * PS)
    assert list(r.diff_pages) == list(range(n))
    assert r.diff_ranges() == [(0, n - 1)]


def test_scattered_differences_match_a_page_by_page_reference(tmp_path, rnd):
    n = 1000
    data = bytearray(rnd.randbytes(n * PS))
    other = bytearray(data)
    want = sorted(rnd.sample(range(n), 57))
    for p in want:
        other[p * PS + rnd.randrange(PS)] ^= 1 << rnd.randrange(8)
    src, dst = pair(tmp_path, data, other)
    for chunk in (PS, 5 * PS, 1 << 20, 1000):  # 1000 is rounded to one page
        assert list(compare_images(src, dst, chunk_size=chunk).diff_pages) == want


def test_size_mismatch_is_an_input_error_naming_both_sizes(tmp_path):
    src, dst = pair(tmp_path, bytes(2 * PS), bytes(3 * PS))
    with pytest.raises(InputError, match=r"images differ in size: .*src.img is 8192 bytes, "
                                         r".*dst.img is 12288 bytes"):
        compare_images(src, dst)


def test_missing_image_is_an_input_error(tmp_path):
    src = write(tmp_path / "src.img", bytes(PS))
    with pytest.raises(InputError, match="does not exist"):
        compare_images(src, tmp_path / "nope.img")
    with pytest.raises(InputError, match="not a regular file"):
        compare_images(src, tmp_path)


def test_partial_last_page_counts_as_a_page(tmp_path, rnd):
    data = bytearray(rnd.randbytes(10 * PS + 100))
    other = bytearray(data)
    src, dst = pair(tmp_path, data, other)
    r = compare_images(src, dst, chunk_size=4 * PS)
    assert r.page_count == 11 and r.identical
    other[10 * PS + 99] ^= 1
    write(dst, other)
    r = compare_images(src, dst, chunk_size=4 * PS)
    assert list(r.diff_pages) == [10]


def test_empty_images_are_identical(tmp_path):
    src, dst = pair(tmp_path, b"", b"")
    r = compare_images(src, dst)
    assert r.identical and r.page_count == 0


def test_bad_page_size_is_an_input_error(tmp_path):
    src, dst = pair(tmp_path, bytes(PS), bytes(PS))
    with pytest.raises(InputError):
        compare_images(src, dst, page_size=0)


def test_group_ranges_merges_consecutive_pages():
    assert group_ranges([]) == []
    assert group_ranges([5]) == [(5, 5)]
    assert group_ranges([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 7), (9, 10)]


def test_guest_phys_addr_uses_the_ram_base():
    assert guest_phys_addr(0) == 0x80000000
    assert guest_phys_addr(0xA3F2) == 0x8A3F2000
    assert guest_phys_addr(3, base=0x40000000) == 0x40003000
    assert guest_phys_addr(1, page_size=65536) == 0x80010000


def test_to_dict_caps_the_page_list_but_keeps_all_ranges(tmp_path, rnd):
    src, dst = pair(tmp_path, rnd.randbytes(50 * PS), rnd.randbytes(50 * PS))
    d = compare_images(src, dst).to_dict(max_pages=10)
    assert d["diff_count"] == 50 and len(d["diff_pages"]) == 10
    assert d["diff_pages_truncated"] and d["diff_ranges"] == [[0, 49]]


def test_read_page_pairs_returns_both_sides(tmp_path, rnd):
    a, b = rnd.randbytes(4 * PS), rnd.randbytes(4 * PS)
    src, dst = pair(tmp_path, a, b)
    got = list(read_page_pairs(src, dst, [1, 3]))
    assert got == [(1, a[PS:2 * PS], b[PS:2 * PS]), (3, a[3 * PS:], b[3 * PS:])]
