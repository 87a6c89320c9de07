"""Comparison across hosts: each host digests its image page by page; only the pages whose
digests differ are fetched (from both sides) into local sparse images, counted in bytes."""

from __future__ import annotations

import os
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from verifier.analysis.compare import DEFAULT_PAGE_SIZE, CompareResult
from verifier.reports.report import diagnose_trial
from verifier.run.hosts import Host, RemoteCommandError


# -- capture and comparison across hosts ---------------------------------------------------------

@dataclass
class RemoteImage:
    host: Host
    path: str  # on the host


def remote_digests(img: RemoteImage, size: int, page_size: int = DEFAULT_PAGE_SIZE,
                   headers: bool = False) -> tuple[list[bytes], list[tuple[int, bytes]], int]:
    """Page digests of a remote image, and with `headers` the 40-byte dirtyram header of every
    page that starts with one (read in the same pass on the host). Returns (digests,
    [(page, header)], bytes received)."""
    pages = -(-size // page_size)
    res = img.host.agent("digest", img.path, "--page-size", str(page_size), *(["--headers"] if headers else []),
                         timeout=600)
    lines = res.stdout.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    digests, heads = lines[:pages], []
    for line in lines[pages:]:
        parts = line.split()
        if len(parts) != 3 or parts[0] != b"H" or len(parts[2]) != 2 * HEADER_BYTES:
            raise RemoteCommandError(f"{img.host.name}: unexpected digest output line {line[:60]!r}")
        heads.append((int(parts[1]), bytes.fromhex(parts[2].decode())))
    if len(digests) != pages or any(d.startswith(b"H ") for d in digests):
        raise RemoteCommandError(f"{img.host.name}: digest of {img.path} has {len(digests)} pages, expected {pages}")
    return digests, heads, len(res.stdout)


HEADER_BYTES = 40  # a dirtyram page header (verifier.pageheader.HEADER_SIZE)


def write_headers_image(heads: list[tuple[int, bytes]], path: Path, size: int,
                        page_size: int = DEFAULT_PAGE_SIZE) -> None:
    """A sparse image holding only the given page headers at their pages: what the
    destination-only invariant reads (the first 40 bytes of each page)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for page, head in heads:
            os.pwrite(f.fileno(), head, page * page_size)


def fetch_pages(img: RemoteImage, pages: list[int], local: Path, size: int,
                page_size: int = DEFAULT_PAGE_SIZE, batch: int = 4096) -> int:
    """Write the given pages of a remote image into a local sparse file; returns bytes fetched."""
    moved = 0
    with open(local, "wb") as f:
        f.truncate(size)
        for i in range(0, len(pages), batch):
            part = pages[i:i + batch]
            res = img.host.agent("pages", img.path, "--page-size", str(page_size), "-",
                                 input=" ".join(map(str, part)).encode(), timeout=600)
            if len(res.stdout) != len(part) * page_size:
                raise RemoteCommandError(f"{img.host.name}: got {len(res.stdout)} bytes for {len(part)} pages")
            for j, p in enumerate(part):
                os.pwrite(f.fileno(), res.stdout[j * page_size:(j + 1) * page_size], p * page_size)
            moved += len(res.stdout)
    return moved


def compare_remote_images(src: RemoteImage, dst: RemoteImage, size: int, local_dir: Path,
                          page_size: int = DEFAULT_PAGE_SIZE) -> tuple[CompareResult, dict]:
    """Digest both images where they are, fetch only differing pages (from both sides) into
    sparse local images ram-src.img / ram-dst.img, and return a CompareResult on those plus
    transfer figures. Pages that are equal are zero in the local sparse images."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        fs = pool.submit(remote_digests, src, size, page_size)
        fd = pool.submit(remote_digests, dst, size, page_size, True)
        (ds, _, src_bytes), (dd, heads, dst_bytes) = fs.result(), fd.result()
    diff = array("Q", (i for i, (a, b) in enumerate(zip(ds, dd)) if a != b))
    digest_bytes = sum(len(x) + 1 for x in ds) + sum(len(x) + 1 for x in dd)
    header_bytes = src_bytes + dst_bytes - digest_bytes
    local = {"src": local_dir / "ram-src.img", "dst": local_dir / "ram-dst.img",
             "dst_headers": local_dir / "dst-headers.img"}
    write_headers_image(heads, local["dst_headers"], size, page_size)
    with ThreadPoolExecutor(2) as pool:
        fs = pool.submit(fetch_pages, src, list(diff), local["src"], size, page_size)
        fd = pool.submit(fetch_pages, dst, list(diff), local["dst"], size, page_size)
        page_bytes = fs.result() + fd.result()
    result = CompareResult(src=local["src"], dst=local["dst"], image_size=size, page_size=page_size,
                           page_count=-(-size // page_size), diff_pages=diff, bytes_compared=size,
                           elapsed=time.perf_counter() - t0)
    figures = {"method": "remote page digests (blake2b-16)", "digest_bytes": digest_bytes,
               "header_bytes": header_bytes, "dst_headers": len(heads), "dst_headers_image": str(local["dst_headers"]),
               "page_bytes": page_bytes, "bytes_moved": digest_bytes + header_bytes + page_bytes,
               "image_bytes": 2 * size, "local_images": "sparse: only the differing pages",
               "src": f"{src.host.name}:{src.path}", "dst": f"{dst.host.name}:{dst.path}"}
    return result, figures


def diagnose_remote(trial, result: CompareResult, ram_base: int, dst_headers: Path | None = None) -> None:
    """verifier.report.diagnose_trial on the fetched pages. The destination-only invariant
    reads only the dirtyram page headers, so it runs on `dst_headers` (a sparse image of the
    headers the destination host sent with its digests); without it, it is not checked."""
    diagnose_trial(trial, result, ram_base, invariant_image=dst_headers)
    trial.compare["destination_invariant"] = ("checked on the destination's page headers" if dst_headers is not None
                                              else "not checked (no page headers from the destination)")
