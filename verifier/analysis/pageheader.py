"""Decoding of the 40-byte dirtyram page header (dirtyram-src/FORMAT.md, version 1).

Besides the decoder this module knows the instance's write order (``write_at`` and
``last_write``), which is deterministic given the instance's total and dirty page counts.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from verifier.errors import InputError

MAGIC = 0x47504C44
MAGIC_BYTES = b"DLPG"
HEADER_SIZE = 40
CHECKSUM_OFFSET = 36
FLAG_HUGETLB = 1 << 0
FLAG_THP = 1 << 1
FORMAT_VERSION = 1

_HEADER = struct.Struct("<IIIIQQII")
_WORDS = struct.Struct("<10I")
_MAGIC_WORD = struct.Struct("<I")


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:  # masking once at the end is exact (only the low 32 bits feed back)
        h = (h ^ b) * 0x01000193
    return h & 0xFFFFFFFF


@dataclass(slots=True)
class PageHeader:
    """A decoded header. ``valid``: checksum matches; ``torn``: magic present, checksum wrong."""

    instance_id: int
    page_index: int
    total_pages: int
    generation: int
    write_seq: int
    flags: int
    checksum: int
    valid: bool
    raw: bytes = field(repr=False, compare=False)

    @property
    def torn(self) -> bool:
        return not self.valid

    @property
    def version(self) -> int:
        return (self.flags >> 8) & 0xFF

    @property
    def hugetlb(self) -> bool:
        return bool(self.flags & FLAG_HUGETLB)

    @property
    def thp(self) -> bool:
        return bool(self.flags & FLAG_THP)

    def words(self) -> tuple[int, ...]:
        """The header as the ten little-endian u32 words dirtyram stores one by one."""
        return _WORDS.unpack(self.raw)

    def to_dict(self) -> dict:
        return {
            "instance_id": self.instance_id,
            "page_index": self.page_index,
            "total_pages": self.total_pages,
            "generation": self.generation,
            "write_seq": self.write_seq,
            "flags": self.flags,
            "checksum": self.checksum,
            "valid": self.valid,
            "torn": self.torn,
        }


def decode(page: bytes | bytearray | memoryview) -> PageHeader | None:
    """Decode the header at offset 0 of ``page``; None when the magic is absent."""
    if len(page) < HEADER_SIZE:
        return None
    raw = bytes(page[:HEADER_SIZE])
    magic, iid, idx, total, gen, seq, flags, csum = _HEADER.unpack(raw)
    if magic != MAGIC:
        return None
    return PageHeader(iid, idx, total, gen, seq, flags, csum,
                      fnv1a32(raw[:CHECKSUM_OFFSET]) == csum, raw)


def encode(instance_id: int, page_index: int, total_pages: int, generation: int,
           write_seq: int, flags: int = FORMAT_VERSION << 8) -> bytes:
    """The 40 header bytes dirtyram stamps for this write (checksum included)."""
    body = _HEADER.pack(MAGIC, instance_id, page_index, total_pages, generation, write_seq,
                        flags, 0)[:CHECKSUM_OFFSET]
    return body + struct.pack("<I", fnv1a32(body))


def unpack_words(raw: bytes) -> tuple[int, ...]:
    return _WORDS.unpack(raw[:HEADER_SIZE])


# --- write order -------------------------------------------------------------------------

def write_at(write_seq: int, total: int, dirty: int | None) -> tuple[int, int]:
    """(page_index, generation) of the instance's write number ``write_seq``."""
    if write_seq < total:
        return write_seq, 0
    if not dirty:
        raise ValueError("the dirty page count is needed beyond pass 0")
    stride = total // dirty
    r = write_seq - total
    g = r // dirty + 1
    k = r % dirty
    return (g - 1) % stride + k * stride, g


def last_write(page_index: int, last_seq: int, total: int,
               dirty: int | None) -> tuple[int, int] | None:
    """(generation, write_seq) of the last write to ``page_index`` among writes 0..last_seq,
    or None when the page was not written yet."""
    p = page_index
    if last_seq < total:
        return (0, p) if p <= last_seq else None
    if not dirty:
        raise ValueError("the dirty page count is needed beyond pass 0")
    stride = total // dirty
    if p >= dirty * stride:
        return 0, p
    r = last_seq - total
    gcur = r // dirty + 1
    kcur = r % dirty
    s = p % stride
    k = p // stride
    g = gcur - ((gcur - 1 - s) % stride)
    if g == gcur and k > kcur:
        g -= stride
    if g < 1:
        return 0, p
    return g, total + (g - 1) * dirty + k


def consistent_with(dirty: int, total: int, page_index: int, generation: int,
                    write_seq: int) -> bool:
    """Could write (page_index, generation, write_seq) occur with this dirty count?"""
    if generation == 0:
        return write_seq == page_index < total
    if dirty <= 0 or dirty > total:
        return False
    stride = total // dirty
    k = write_seq - total - (generation - 1) * dirty
    return 0 <= k < dirty and page_index == (generation - 1) % stride + k * stride


def infer_dirty(total: int, observations: list[tuple[int, int, int]],
                sample: int = 2000) -> int | None:
    """Infer dirtyram's DIRTY_PAGES argument from valid (page_index, generation, write_seq)
    observations of one instance. Returns None when no observation is past pass 0 (the dirty
    count is then irrelevant) or when no dirty count explains them.

    When several dirty counts explain every observation (pass 1 not finished), the one
    returned predicts the same page states up to the newest observed write.
    """
    later = [o for o in observations if o[1] >= 1]
    if not later:
        return None
    p, g, s = max(later, key=lambda o: (o[1], o[2]))
    r = s - total
    if r < 0:
        return None
    if g >= 2:
        lo = r // g + 1              # g*d > r
        hi = r // (g - 1)            # (g-1)*d <= r
        cands = [d for d in range(max(lo, 1), min(hi, total) + 1)
                 if consistent_with(d, total, p, g, s)]
    else:
        # pass 1: page = k*stride with k = r; any d with that stride and d > k
        ks = [(o[0], o[2] - total) for o in later if o[2] - total > 0]
        cands = []
        strides = {pi // k for pi, k in ks if pi % k == 0} if ks else {None}
        for st in strides:
            if st is None:
                d = total          # only page 0 of pass 1 seen: stride irrelevant so far
            else:
                if st < 1:
                    continue
                d = total // st
            if d > r and consistent_with(d, total, p, g, s):
                cands.append(d)
    if not cands:
        return None
    if len(cands) == 1:
        return cands[0]
    step = max(1, len(later) // sample)
    probe = later[::step]
    return max(cands, key=lambda d: sum(consistent_with(d, total, *o) for o in probe))


# --- whole-image scan --------------------------------------------------------------------

@dataclass
class InstanceInfo:
    """What an image holds of one dirtyram instance.

    ``pages`` maps page_index -> list of (image_page, header) of the valid headers found
    (more than one entry when the page appears several times in the image, e.g. a stale
    copy the guest kernel left in a freed frame after compaction). ``torn`` lists the torn
    headers whose instance_id field names this instance.
    """

    instance_id: int
    total_pages: int = 0
    flags: int = 0
    pages: dict[int, list[tuple[int, PageHeader]]] = field(default_factory=dict)
    torn: list[tuple[int, PageHeader]] = field(default_factory=list)
    total_pages_seen: set[int] = field(default_factory=set)
    max_generation: int = -1
    max_write_seq: int = -1

    @property
    def pages_found(self) -> int:
        return len(self.pages)

    def image_pages(self) -> dict[int, list[int]]:
        """page_index -> image page numbers (guest-physical page = base/page_size + this)."""
        return {idx: [ip for ip, _ in locs] for idx, locs in self.pages.items()}

    def to_dict(self) -> dict:
        return {
            "instance_id": self.instance_id,
            "total_pages": self.total_pages,
            "pages_found": self.pages_found,
            "torn_headers": len(self.torn),
            "max_generation": self.max_generation,
            "max_write_seq": self.max_write_seq,
            "flags": self.flags,
        }


@dataclass
class ScanResult:
    image_size: int
    page_size: int
    page_count: int
    instances: dict[int, InstanceInfo] = field(default_factory=dict)
    torn: list[tuple[int, PageHeader]] = field(default_factory=list)
    magic_pages: int = 0


def _add(result: ScanResult, image_page: int, hdr: PageHeader) -> None:
    inst = result.instances.get(hdr.instance_id)
    if hdr.torn:
        result.torn.append((image_page, hdr))
        if inst is not None:
            inst.torn.append((image_page, hdr))
        return
    if inst is None:
        inst = result.instances[hdr.instance_id] = InstanceInfo(hdr.instance_id)
    inst.pages.setdefault(hdr.page_index, []).append((image_page, hdr))
    inst.total_pages_seen.add(hdr.total_pages)
    if hdr.write_seq > inst.max_write_seq:
        inst.max_write_seq = hdr.write_seq
        inst.total_pages = hdr.total_pages
        inst.flags = hdr.flags
    if hdr.generation > inst.max_generation:
        inst.max_generation = hdr.generation


def scan_instances(image_path: Path, page_size: int = 4096,
                   chunk_size: int = 1 << 20) -> ScanResult:
    """Find every page of ``image_path`` whose first bytes hold a dirtyram header.

    Only offset 0 of each page is examined: a strided memoryview picks the first u32 of
    every page of a chunk into a small contiguous buffer, searched for the magic with
    ``bytes.find`` (C speed), so non-dirtyram pages cost nothing in Python.
    """
    image_path = Path(image_path)
    if page_size < HEADER_SIZE or page_size % 4:
        raise InputError(f"page size {page_size} cannot hold a dirtyram header")
    try:
        size = os.stat(image_path).st_size
        f = open(image_path, "rb", buffering=0)
    except OSError as e:
        raise InputError(f"cannot read image {image_path}: {e.strerror}") from None
    chunk_size = max(page_size, chunk_size - chunk_size % page_size)
    words_per_page = page_size // 4
    result = ScanResult(size, page_size, -(-size // page_size))
    buf = bytearray(chunk_size)
    mv = memoryview(buf)
    off = 0
    with f:
        try:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        while True:
            try:
                n = f.readinto(buf)
            except OSError as e:
                raise InputError(f"cannot read image {image_path} at {off}: {e.strerror}") from None
            if not n:
                break
            first_page = off // page_size
            whole = n - n % page_size
            if whole:
                heads = mv[:whole].cast("I")[::words_per_page].tobytes()
                pos = heads.find(MAGIC_BYTES)
                while pos >= 0:
                    if pos % 4 == 0:
                        o = (pos // 4) * page_size
                        hdr = decode(mv[o:o + HEADER_SIZE])
                        if hdr is not None:
                            result.magic_pages += 1
                            _add(result, first_page + pos // 4, hdr)
                        pos = heads.find(MAGIC_BYTES, pos + 4)
                    else:
                        pos = heads.find(MAGIC_BYTES, pos + 4 - pos % 4)
            if whole != n:  # partial last page
                hdr = decode(mv[whole:n])
                if hdr is not None:
                    result.magic_pages += 1
                    _add(result, first_page + whole // page_size, hdr)
            off += n
    mv.release()
    return result
