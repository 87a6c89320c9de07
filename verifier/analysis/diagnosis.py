"""Why does a destination page differ from the source page?  And is the destination image
consistent on its own?

``classify_page`` looks at one differing page pair; ``analyse`` classifies the differing
pages of a ``CompareResult`` (the first ``limit`` in detail, the rest only counted) and groups
them into ranges (``diagnose`` returns just those ranges as JSON-able dicts);
``render_text`` prints them one a line. ``destination_invariant``
checks the destination image alone against dirtyram's deterministic write order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from verifier.analysis.compare import (DEFAULT_PAGE_SIZE, RAM_BASE_VEXPRESS_A15, CompareResult, guest_phys_addr, read_page_pairs)
from verifier.errors import CaptureError
from verifier.analysis.pageheader import (HEADER_SIZE, PageHeader, decode, encode, infer_dirty, last_write, scan_instances, unpack_words, write_at)

STALE = "stale"
NEVER_SENT = "never-sent"
IMPOSSIBLE = "impossible"
TORN = "torn"
NOT_DIRTYRAM = "not-dirtyram"
KINDS = (STALE, NEVER_SENT, IMPOSSIBLE, TORN, NOT_DIRTYRAM)

_HEX_BYTES = 16


@dataclass
class PageDiagnosis:
    """Why one page differs. ``lag`` = src generation - dst generation, ``seq_lag`` = src
    write_seq - dst write_seq (both only when the two headers are comparable).
    ``first_diff`` is the offset of the first differing byte; ``src_hex``/``dst_hex`` the
    16 bytes from there on each side."""

    image_page: int
    kind: str
    src: PageHeader | None = None
    dst: PageHeader | None = None
    lag: int | None = None
    seq_lag: int | None = None
    first_diff: int | None = None
    src_hex: str = ""
    dst_hex: str = ""
    torn_side: str | None = None   # "src", "dst" or "both"
    note: str = ""

    @property
    def instance_id(self) -> int | None:
        h = self.src if self.src is not None and self.src.valid else self.dst
        if h is None or not h.valid:
            h = self.src or self.dst
        return None if h is None else h.instance_id

    @property
    def page_index(self) -> int | None:
        h = self.src if self.src is not None and self.src.valid else self.dst
        if h is None or not h.valid:
            h = self.src or self.dst
        return None if h is None else h.page_index


def _first_diff(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    if a[:n] == b[:n]:
        return n
    # binary search on prefix equality: C-speed compares, log2(page) steps
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def classify_page(src_page: bytes, dst_page: bytes, image_page: int = 0) -> PageDiagnosis:
    """Classify one differing page (see the module doc of the kinds)."""
    hs, hd = decode(src_page), decode(dst_page)
    off = _first_diff(src_page, dst_page)
    d = PageDiagnosis(image_page, NOT_DIRTYRAM, hs, hd, first_diff=off,
                      src_hex=bytes(src_page[off:off + _HEX_BYTES]).hex(),
                      dst_hex=bytes(dst_page[off:off + _HEX_BYTES]).hex())
    if (hs is not None and hd is not None and hs.valid and hd.valid
            and hs.instance_id == hd.instance_id and hs.page_index == hd.page_index):
        d.lag = hs.generation - hd.generation
        d.seq_lag = hs.write_seq - hd.write_seq
        if hd.generation > hs.generation or hd.write_seq > hs.write_seq:
            d.kind = IMPOSSIBLE
            d.note = "destination holds a newer write than the source"
        elif (hd.generation, hd.write_seq) < (hs.generation, hs.write_seq):
            d.kind = STALE
        else:
            d.note = "same header, page body differs"
        return d
    if not any(dst_page) and any(src_page):
        d.kind = NEVER_SENT
        return d
    torn_src = hs is not None and hs.torn
    torn_dst = hd is not None and hd.torn
    if torn_src or torn_dst:
        d.kind = TORN
        d.torn_side = "both" if torn_src and torn_dst else ("src" if torn_src else "dst")
        return d
    if not any(src_page):
        d.note = "source page is all zero"
    return d


@dataclass
class DiagnosisRange:
    """Consecutive image pages with the same diagnosis and instance whose page_index runs by one,
    upwards or downwards (the guest allocator often maps a buffer in descending physical order)."""

    kind: str
    first_page: int
    last_page: int
    phys_start: int
    phys_end: int          # inclusive
    instance_id: int | None = None
    first_index: int | None = None
    last_index: int | None = None
    lag_min: int | None = None
    lag_max: int | None = None
    seq_lag_min: int | None = None
    seq_lag_max: int | None = None
    src_gen_min: int | None = None
    src_gen_max: int | None = None
    dst_gen_min: int | None = None
    dst_gen_max: int | None = None
    first: PageDiagnosis | None = field(default=None, repr=False)
    index_step: int = 0  # +1 or -1 once the range has two pages of one instance

    @property
    def pages(self) -> int:
        return self.last_page - self.first_page + 1

    def to_dict(self) -> dict:
        d = {
            "diagnosis": self.kind,
            "start": f"{self.phys_start:#x}",
            "end": f"{self.phys_end:#x}",
            "pages": self.pages,
            "first_page": self.first_page,
            "last_page": self.last_page,
            "instance_id": self.instance_id,
            "first_index": self.first_index,
            "last_index": self.last_index,
            "lag_min": self.lag_min,
            "lag_max": self.lag_max,
            "seq_lag_min": self.seq_lag_min,
            "seq_lag_max": self.seq_lag_max,
            "src_gen_min": self.src_gen_min,
            "src_gen_max": self.src_gen_max,
            "dst_gen_min": self.dst_gen_min,
            "dst_gen_max": self.dst_gen_max,
        }
        f = self.first
        if f is not None:
            d.update(first_diff=f.first_diff, src_hex=f.src_hex, dst_hex=f.dst_hex,
                     torn_side=f.torn_side, note=f.note or None)
        d["text"] = self.render()
        return d

    def render(self) -> str:
        span = f"{self.phys_start:#010x}-{self.phys_end:#010x}"
        n = self.pages
        parts = [span, f"{n} page{'s' if n != 1 else ''}", self.kind]
        if self.instance_id is not None:
            lo, hi = sorted((self.first_index, self.last_index))
            idx = (f"page {lo}" if lo == hi else f"pages {lo}-{hi}"
                   + (" (descending in memory)" if self.index_step < 0 else ""))
            parts.append(f"instance {self.instance_id} {idx}")
        if self.kind in (STALE, IMPOSSIBLE) and self.lag_min is not None:
            dst_g = _span(self.dst_gen_min, self.dst_gen_max)
            src_g = _span(self.src_gen_min, self.src_gen_max)
            rel = "<" if self.kind == STALE else ">="
            lag = _span(self.lag_min, self.lag_max)
            parts.append(f"dst gen {dst_g} {rel} src gen {src_g} (lag {lag}, "
                         f"write_seq lag {_span(self.seq_lag_min, self.seq_lag_max)})")
        f = self.first
        if f is not None:
            if self.kind == TORN:
                parts.append(f"torn header on {f.torn_side}")
            if self.kind in (NOT_DIRTYRAM, TORN) or f.note:
                if f.first_diff is not None and self.kind != IMPOSSIBLE:
                    parts.append(f"first diff at +{f.first_diff:#x}: src {f.src_hex} "
                                 f"dst {f.dst_hex}")
                if f.note:
                    parts.append(f.note)
        return "  ".join(parts)


def _span(lo, hi) -> str:
    return f"{lo}" if lo == hi else f"{lo}..{hi}"


def _minmax(r: DiagnosisRange, attr: str, v: int | None) -> None:
    if v is None:
        return
    lo, hi = getattr(r, attr + "_min"), getattr(r, attr + "_max")
    setattr(r, attr + "_min", v if lo is None else min(lo, v))
    setattr(r, attr + "_max", v if hi is None else max(hi, v))


def group_diagnoses(diags: Iterable[PageDiagnosis], base: int = RAM_BASE_VEXPRESS_A15,
                    page_size: int = DEFAULT_PAGE_SIZE) -> list[DiagnosisRange]:
    """Group page diagnoses (ascending image pages) into ranges."""
    ranges: list[DiagnosisRange] = []
    cur: DiagnosisRange | None = None
    for d in diags:
        iid, idx = d.instance_id, d.page_index
        step = None if cur is None or iid is None or idx is None or cur.last_index is None else idx - cur.last_index
        if (cur is not None and d.kind == cur.kind and d.image_page == cur.last_page + 1
                and iid == cur.instance_id
                and (iid is None or (step in (1, -1) and cur.index_step in (0, step)))):
            cur.last_page = d.image_page
            cur.last_index = idx
            cur.index_step = step or 0
        else:
            cur = DiagnosisRange(d.kind, d.image_page, d.image_page,
                                 guest_phys_addr(d.image_page, base, page_size), 0,
                                 instance_id=iid, first_index=idx, last_index=idx, first=d)
            ranges.append(cur)
        cur.phys_end = guest_phys_addr(d.image_page + 1, base, page_size) - 1
        _minmax(cur, "lag", d.lag)
        _minmax(cur, "seq_lag", d.seq_lag)
        if d.lag is not None:
            _minmax(cur, "src_gen", d.src.generation)
            _minmax(cur, "dst_gen", d.dst.generation)
    return ranges


@dataclass
class DiagnosisReport:
    """``counts`` covers the pages diagnosed in detail (the first ``limit`` differing pages);
    ``undiagnosed`` is how many differing pages were past the limit."""

    diff_count: int
    ranges: list[DiagnosisRange]
    counts: dict[str, int]
    undiagnosed: int = 0

    @property
    def impossible(self) -> bool:
        return self.counts.get(IMPOSSIBLE, 0) > 0

    def raise_for_capture(self) -> None:
        """Raise CaptureError when a destination page is newer than the source's: the
        capture, not the migration, is then wrong and no verdict can be given."""
        if self.impossible:
            r = next(r for r in self.ranges if r.kind == IMPOSSIBLE)
            raise CaptureError(
                f"{self.counts[IMPOSSIBLE]} destination page(s) hold newer dirtyram writes "
                f"than the source (first: {r.render()}); the source image was not captured "
                f"after the destination's last write")

    def to_dict(self) -> dict:
        return {
            "diff_count": self.diff_count,
            "diagnosed": self.diff_count - self.undiagnosed,
            "undiagnosed": self.undiagnosed,
            "counts": dict(self.counts),
            "impossible": self.impossible,
            "ranges": [r.to_dict() for r in self.ranges],
        }


def analyse(result: CompareResult, base: int = RAM_BASE_VEXPRESS_A15,
            limit: int = 100_000) -> DiagnosisReport:
    """Classify the first ``limit`` differing pages of ``result`` (re-reading both images)."""
    pages = result.diff_pages[:limit]
    diags = [classify_page(a, b, p)
             for p, a, b in read_page_pairs(result.src, result.dst, pages, result.page_size)]
    counts = {k: 0 for k in KINDS}
    for d in diags:
        counts[d.kind] += 1
    return DiagnosisReport(result.diff_count, group_diagnoses(diags, base, result.page_size),
                           counts, result.diff_count - len(diags))


def diagnose(result: CompareResult, base: int = RAM_BASE_VEXPRESS_A15,
             limit: int = 100_000) -> list[dict]:
    """The JSON-able ranges of ``analyse(result, base, limit)``: one dict a range with keys
    diagnosis, start, end (hex strings), pages, text, ... (see DiagnosisRange.to_dict).
    Use ``analyse`` for counts, the undiagnosed tail and ``raise_for_capture``."""
    return analyse(result, base, limit).to_dict()["ranges"]


def render_text(report: DiagnosisReport, max_lines: int = 50) -> str:
    """Short human rendering: a summary line and at most ``max_lines`` ranges."""
    if not report.diff_count:
        return "images are identical"
    summary = ", ".join(f"{n} {k}" for k, n in report.counts.items() if n)
    lines = [f"{report.diff_count} differing page(s): {summary}"
             + (f", {report.undiagnosed} not diagnosed" if report.undiagnosed else "")]
    lines += [r.render() for r in report.ranges[:max_lines]]
    if len(report.ranges) > max_lines:
        lines.append(f"... {len(report.ranges) - max_lines} more range(s)")
    return "\n".join(lines)


# --- destination-only invariant ------------------------------------------------------------

LOST_WRITE = "lost-write"
MISSING = "missing-page"
UNEXPECTED = "unexpected-write"
DUPLICATE = "duplicate-copy"
TORN_ELSEWHERE = "torn-not-at-front"
HEADER_MISMATCH = "header-mismatch"
UNKNOWN_ORDER = "unknown-write-order"


@dataclass
class Finding:
    """One violation of the destination invariant. ``severity`` is "error" (the image
    contradicts dirtyram's write order: a lost or wrong write) or "warning" (explainable by
    the guest itself, e.g. a stale copy left by the guest kernel in a freed frame)."""

    kind: str
    instance_id: int | None
    page_index: int | None
    image_page: int | None
    phys_addr: int | None
    expected_generation: int | None = None
    found_generation: int | None = None
    expected_write_seq: int | None = None
    found_write_seq: int | None = None
    severity: str = "error"
    message: str = ""

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        if self.phys_addr is not None:
            d["phys_addr"] = f"{self.phys_addr:#x}"
        d["text"] = self.render()
        return d

    def render(self) -> str:
        where = f"{self.phys_addr:#010x}  " if self.phys_addr is not None else ""
        return f"{where}{self.severity}  {self.kind}  {self.message}"


def _torn_matches_front(torn: PageHeader, new: bytes, old: bytes) -> bool:
    """Is ``torn`` the write ``new`` stopped after storing its first j (1..9) u32 words over
    the previous header ``old``? dirtyram stores the ten words in order, checksum last."""
    t, n, o = unpack_words(torn.raw), unpack_words(new), unpack_words(old)
    for j in range(1, 10):
        if t[:j] == n[:j] and t[j:] == o[j:]:
            return True
    return False


def destination_invariant(dst_image: Path, page_size: int = DEFAULT_PAGE_SIZE,
                          base: int = RAM_BASE_VEXPRESS_A15,
                          dirty: int | dict[int, int] | None = None) -> list[Finding]:
    """Check every dirtyram instance of ``dst_image`` against its write order.

    With W the newest write_seq found for an instance, dirtyram's write order (FORMAT.md) says
    exactly which (generation, write_seq) every page must hold after writes 0..W. Each page
    must be present with exactly that header; an older one is a lost write. The only torn
    header allowed is write W+1 interrupted by the VM stop (checked word by word against the
    previous header of that page). ``dirty`` (DIRTY_PAGES of the dirtyram command line, per
    instance id or for all) is inferred from the headers when not given.

    Writes lost after the last write that reached the destination cannot be seen from the
    destination alone; comparing with the source catches those.
    """
    scan = scan_instances(dst_image, page_size)
    findings: list[Finding] = []
    explained_torn: set[int] = set()

    def addr(ip):
        return None if ip is None else guest_phys_addr(ip, base, page_size)

    for iid, inst in sorted(scan.instances.items()):
        total = inst.total_pages
        W = inst.max_write_seq
        for idx, locs in sorted(inst.pages.items()):
            for ip, h in locs:
                if h.total_pages != total or idx >= total:
                    findings.append(Finding(
                        HEADER_MISMATCH, iid, idx, ip, addr(ip),
                        message=f"instance {iid} page {idx}: total_pages {h.total_pages}, "
                                f"instance has {total}"))
        obs = [(idx, h.generation, h.write_seq) for idx, locs in inst.pages.items()
               for _, h in locs if h.total_pages == total]
        d = dirty.get(iid) if isinstance(dirty, dict) else dirty
        if d is None:
            d = infer_dirty(total, obs)
        if W >= total and not d:
            findings.append(Finding(
                UNKNOWN_ORDER, iid, None, None, None,
                message=f"instance {iid}: no dirty page count explains its headers; "
                        f"write order cannot be checked"))
            continue
        # the write the VM stop may have interrupted
        # write `total` is page 0 of pass 1 whatever the dirty count
        front_idx, front_gen = write_at(W + 1, total, d or total)
        front_prev = last_write(front_idx, W, total, d)
        front_new = encode(iid, front_idx, total, front_gen, W + 1, inst.flags)
        front_old = (encode(iid, front_idx, total, *front_prev, inst.flags)
                     if front_prev else bytes(HEADER_SIZE))
        front_ok = False
        for ip, h in scan.torn:
            if ip not in explained_torn and _torn_matches_front(h, front_new, front_old):
                explained_torn.add(ip)
                front_ok = True
                break
        for idx in range(total):
            exp = last_write(idx, W, total, d)
            locs = inst.pages.get(idx, [])
            if exp is None:
                for ip, h in locs:
                    findings.append(Finding(
                        UNEXPECTED, iid, idx, ip, addr(ip), None, h.generation, None,
                        h.write_seq, message=f"instance {iid} page {idx} holds gen "
                        f"{h.generation} seq {h.write_seq} but the newest write is {W}"))
                continue
            eg, es = exp
            match = [(ip, h) for ip, h in locs if (h.generation, h.write_seq) == exp]
            if not locs:
                if front_ok and idx == front_idx:
                    continue
                findings.append(Finding(
                    MISSING, iid, idx, None, None, eg, None, es, None,
                    message=f"instance {iid} page {idx} not found (expected gen {eg} "
                            f"seq {es})"))
                continue
            if match:
                # one copy is right; older copies can be frames the guest kernel freed
                live = match[0][0]
                for ip, h in locs:
                    if ip == live:
                        continue
                    findings.append(Finding(
                        DUPLICATE, iid, idx, ip, addr(ip), eg, h.generation, es,
                        h.write_seq, severity="warning" if (h.generation, h.write_seq) < exp
                        else "error",
                        message=f"instance {iid} page {idx} also at image page {ip} with "
                                f"gen {h.generation} seq {h.write_seq} (live copy at image "
                                f"page {live} gen {eg})"))
                continue
            for ip, h in locs:
                older = (h.generation, h.write_seq) < exp
                findings.append(Finding(
                    LOST_WRITE if older else UNEXPECTED, iid, idx, ip, addr(ip), eg,
                    h.generation, es, h.write_seq,
                    message=f"instance {iid} page {idx}: gen {h.generation} seq "
                            f"{h.write_seq}, expected gen {eg} seq {es} after write {W}"
                            + (f" (lag {eg - h.generation})" if older else "")))
    for ip, h in scan.torn:
        if ip in explained_torn:
            continue
        if h.instance_id not in scan.instances:
            t = h.words()
            first = encode(t[1], 0, t[3], 0, 0, t[8])
            if _torn_matches_front(h, first, bytes(HEADER_SIZE)):
                continue  # very first write of an instance, interrupted by the VM stop
        findings.append(Finding(
            TORN_ELSEWHERE, h.instance_id if h.instance_id in scan.instances else None,
            h.page_index, ip, addr(ip),
            message=f"torn header (instance field {h.instance_id}, page field "
                    f"{h.page_index}) is not the write interrupted by the VM stop"))
    findings.sort(key=lambda f: (f.severity != "error", f.instance_id or 0,
                                 f.page_index if f.page_index is not None else -1))
    return findings
