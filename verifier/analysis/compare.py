"""Page-by-page comparison of two raw guest RAM images.

The comparator reads both images sequentially into two preallocated buffers and compares
whole chunks with ``bytearray ==`` (a memcmp in C); only a chunk that differs is walked page
by page (by way of 64 KiB sub-blocks) to find every differing page. Memory use is two chunk
buffers plus 8 bytes per differing page.

Measured on the development machine (2 cores, page cache hot, 256 MiB images): 1 MiB chunks
take ~0.045 s, 16 MiB chunks ~0.08 s (they no longer fit the CPU caches), mmap + slices
~0.07-0.36 s, ``cmp`` ~0.15 s. Comparing two ``memoryview`` objects is not a memcmp (CPython
compares them item by item), so the code never does it.
"""

from __future__ import annotations

import os
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from verifier.errors import CaptureError, InputError

DEFAULT_PAGE_SIZE = 4096
DEFAULT_CHUNK_SIZE = 1 << 20
_SUB_BLOCK = 64 << 10

# Guest-physical address where RAM starts on the machine types dirtylog uses.
RAM_BASE_VEXPRESS_A15 = 0x80000000
RAM_BASE_VIRT = 0x40000000


@dataclass
class CompareResult:
    """What ``compare_images`` found.

    ``diff_pages`` holds the index of every differing page in ascending order (an
    ``array('Q')``, 8 bytes a page: 4 MiB for a 2 GiB image whose pages all differ).
    """

    src: Path
    dst: Path
    image_size: int
    page_size: int
    page_count: int
    diff_pages: array = field(default_factory=lambda: array("Q"))
    bytes_compared: int = 0
    elapsed: float = 0.0

    @property
    def diff_count(self) -> int:
        return len(self.diff_pages)

    @property
    def identical(self) -> bool:
        return not self.diff_pages

    def diff_ranges(self) -> list[tuple[int, int]]:
        return group_ranges(self.diff_pages)

    def to_dict(self, max_pages: int = 1000) -> dict:
        """JSON-able summary; lists at most ``max_pages`` page indexes (ranges are complete)."""
        return {
            "src": str(self.src),
            "dst": str(self.dst),
            "image_size": self.image_size,
            "page_size": self.page_size,
            "page_count": self.page_count,
            "diff_count": self.diff_count,
            "diff_pages": list(self.diff_pages[:max_pages]),
            "diff_pages_truncated": self.diff_count > max_pages,
            "diff_ranges": [list(r) for r in self.diff_ranges()],
            "bytes_compared": self.bytes_compared,
            "elapsed": round(self.elapsed, 6),
        }


def _image_size(path: Path, role: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{role} image {path} does not exist") from None
    except OSError as e:
        raise InputError(f"cannot stat {role} image {path}: {e.strerror}") from None
    if not os.path.isfile(path):
        raise InputError(f"{role} image {path} is not a regular file")
    return st.st_size


def _open(path: Path, role: str):
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise InputError(f"cannot open {role} image {path}: {e.strerror}") from None
    try:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):  # advisory only
        pass
    return f


def _diff_pages_in_chunk(a: bytearray, b: bytearray, n: int, first_page: int, page_size: int,
                         out: array) -> None:
    """Append to ``out`` the index of every page of a[:n] that differs from b[:n]."""
    sub = max(page_size, _SUB_BLOCK - _SUB_BLOCK % page_size)
    for s in range(0, n, sub):
        e = min(s + sub, n)
        if a[s:e] == b[s:e]:
            continue
        for o in range(s, e, page_size):
            pe = min(o + page_size, e)
            if a[o:pe] != b[o:pe]:
                out.append(first_page + o // page_size)


def compare_images(src: Path, dst: Path, page_size: int = DEFAULT_PAGE_SIZE,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> CompareResult:
    """Compare two raw RAM images and report every differing page.

    Raises InputError when a file is missing or unreadable, when the sizes differ or when
    page_size/chunk_size are not positive; CaptureError when an image changes size while it
    is being read. An image whose size is not a multiple of page_size is compared anyway and
    its last partial page counts as a page.
    """
    src, dst = Path(src), Path(dst)
    if page_size <= 0:
        raise InputError(f"page size must be positive, got {page_size}")
    if chunk_size <= 0:
        raise InputError(f"chunk size must be positive, got {chunk_size}")
    chunk_size = max(page_size, chunk_size - chunk_size % page_size)

    size_a = _image_size(src, "source")
    size_b = _image_size(dst, "destination")
    if size_a != size_b:
        raise InputError(f"images differ in size: {src} is {size_a} bytes, "
                         f"{dst} is {size_b} bytes")

    result = CompareResult(src=src, dst=dst, image_size=size_a, page_size=page_size,
                           page_count=-(-size_a // page_size))
    buf_a = bytearray(chunk_size)
    buf_b = bytearray(chunk_size)
    diffs = result.diff_pages
    done = 0
    t0 = time.perf_counter()
    with _open(src, "source") as fa, _open(dst, "destination") as fb:
        while True:
            try:
                na = fa.readinto(buf_a)
            except OSError as e:
                raise InputError(f"cannot read source image {src} at offset {done}: "
                                 f"{e.strerror}") from None
            try:
                nb = fb.readinto(buf_b)
            except OSError as e:
                raise InputError(f"cannot read destination image {dst} at offset {done}: "
                                 f"{e.strerror}") from None
            if na != nb or (na == 0 and done != size_a):
                raise CaptureError(f"images changed while being compared: read {na} bytes "
                                   f"of {src} and {nb} bytes of {dst} at offset {done} "
                                   f"(both were {size_a} bytes)")
            if na == 0:
                break
            if na == chunk_size:
                same = buf_a == buf_b
            else:
                same = buf_a[:na] == buf_b[:na]
            if not same:
                _diff_pages_in_chunk(buf_a, buf_b, na, done // page_size, page_size, diffs)
            done += na
            if done > size_a:
                raise CaptureError(f"image {src} or {dst} grew while being compared "
                                   f"(was {size_a} bytes)")
    result.bytes_compared = done
    result.elapsed = time.perf_counter() - t0
    return result


def group_ranges(page_indexes: Iterable[int]) -> list[tuple[int, int]]:
    """Group ascending page indexes into inclusive (first, last) runs of consecutive pages."""
    ranges: list[tuple[int, int]] = []
    first = last = None
    for p in page_indexes:
        if last is not None and p == last + 1:
            last = p
            continue
        if first is not None:
            ranges.append((first, last))
        first = last = p
    if first is not None:
        ranges.append((first, last))
    return ranges


def guest_phys_addr(page_index: int, base: int = RAM_BASE_VEXPRESS_A15,
                    page_size: int = DEFAULT_PAGE_SIZE) -> int:
    """Guest-physical address of the first byte of image page ``page_index``.

    The image is guest RAM from its first byte, so page i lives at base + i * page_size
    (vexpress-a15: base 0x80000000; virt: 0x40000000).
    """
    return base + page_index * page_size


def read_page_pairs(src: Path, dst: Path, page_indexes: Iterable[int],
                    page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[tuple[int, bytes, bytes]]:
    """Yield (page_index, src_page, dst_page) for the given pages, read with pread."""
    src, dst = Path(src), Path(dst)
    with _open(src, "source") as fa, _open(dst, "destination") as fb:
        for p in page_indexes:
            off = p * page_size
            try:
                a = os.pread(fa.fileno(), page_size, off)
                b = os.pread(fb.fileno(), page_size, off)
            except OSError as e:
                raise InputError(f"cannot read page {p} of {src} or {dst}: {e.strerror}") from None
            yield p, a, b
