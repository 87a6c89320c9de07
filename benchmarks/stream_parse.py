#!/usr/bin/env python3
"""Throughput of the migration stream parser (verifier.analysis.stream) on a stream of mostly full pages.

The stream is real by default: a paused QEMU (`-machine virt -S`, no kernel) whose RAM is filled with
random bytes through `-device loader`, migrated with `exec:cat > FILE` (max-bandwidth lifted), so
nearly every page is a RAM_SAVE_FLAG_PAGE record. With --synthetic (or when no QEMU is found) the
same shape of stream is generated in memory instead. The file is read into memory once, then fed to
`StreamParser` in --chunk sized pieces, --repeat times per mode; the best run is printed, in GB/s
(10^9 bytes of stream per second), for these modes:

    counts only        StreamParser()                    (the default: 40-byte heads kept for XBZRLE)
    on_page            StreamParser(on_page=callback)    (a PageRecord per page, as the live tap does)
    on_page+content    StreamParser(on_page=callback, content=True)  (and a view of each page's bytes)
    no copies          StreamParser(xbzrle=False)
    full copies        StreamParser(xbzrle=True)         (every page's content kept)
    parse_file         verifier.analysis.stream_files.parse_file(FILE) (1 MiB reads from the page cache)

Run it from the repository root:

    .venv/bin/python benchmarks/stream_parse.py [--qemu PATH] [--mem 512] [--chunk 1048576] [--repeat 3]
    .venv/bin/python benchmarks/stream_parse.py --synthetic [--mem 512]
    .venv/bin/python benchmarks/stream_parse.py --file RECORDED_MAIN_CHANNEL

It exits 0 and prints one line per mode; the target is >= 1 GB/s for `on_page`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from verifier.analysis.stream import StreamParser  # noqa: E402
from verifier.analysis.stream_files import parse_file  # noqa: E402

RAM_BASE = 0x40000000  # virt
FILL_OFFSET = 2 << 20  # leave the DTB at the bottom of RAM alone


def record_stream(qemu_path: str, mem_mb: int, workdir: Path) -> Path:
    from verifier.run.qemu import QemuProcess, probe_qemu
    qemu = probe_qemu(qemu_path)
    fill = workdir / "fill.bin"
    with open(fill, "wb") as f:
        left = (mem_mb << 20) - FILL_OFFSET
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n
    out = workdir / "stream.bin"
    args = ["-machine", "virt", "-accel", "tcg", "-m", str(mem_mb), "-smp", "1", "-display", "none", "-S",
            "-nodefaults", "-device", f"loader,file={fill},addr=0x{RAM_BASE + FILL_OFFSET:x}"]
    with QemuProcess(qemu, args, workdir, "bench") as q:
        q.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        q.qmp("migrate", uri=f"exec:cat > {out}")
        deadline = time.monotonic() + 300
        while True:
            st = q.qmp("query-migrate")
            if st.get("status") == "completed":
                break
            if st.get("status") == "failed" or time.monotonic() > deadline:
                raise SystemExit(f"migration did not complete: {st}")
            time.sleep(0.05)
    fill.unlink()
    print(f"recorded {out.stat().st_size} bytes with {qemu.version_text}", file=sys.stderr)
    return out


def synthetic_stream(mem_mb: int) -> bytes:
    ps = 4096
    n = (mem_mb << 20) // ps
    name = b"mach-virt.ram"
    out = bytearray(b"QEVM\0\0\0\x03")
    out += b"\x01" + struct.pack(">I", 1) + b"\x03ram" + struct.pack(">II", 0, 4)
    out += struct.pack(">Q", n * ps | 0x04) + bytes([len(name)]) + name + struct.pack(">Q", n * ps)
    out += struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 1)
    out += b"\x02" + struct.pack(">I", 1)
    pages = [os.urandom(ps) for _ in range(16)]
    out += struct.pack(">Q", 0x08) + bytes([len(name)]) + name + pages[0]
    for i in range(1, n):
        out += struct.pack(">Q", i * ps | 0x28) + pages[i % 16]
    out += struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 1) + b"\x00"
    return bytes(out)


class Counter:
    def __init__(self):
        self.n = 0

    def __call__(self, record, content=None):
        self.n += 1


def feed_all(data: bytes, chunk: int, **kw) -> tuple[float, object]:
    p = StreamParser(**kw)
    view = memoryview(data)
    t0 = time.perf_counter()
    for i in range(0, len(data), chunk):
        p.feed(view[i:i + chunk])
    s = p.close()
    return time.perf_counter() - t0, s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qemu", default="qemu-system-arm", help="QEMU that records the stream (default: on PATH)")
    ap.add_argument("--mem", type=int, default=512, help="guest RAM in MiB (default 512)")
    ap.add_argument("--chunk", type=int, default=1 << 20, help="bytes per feed() (default 1 MiB)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode; the best is printed (default 3)")
    ap.add_argument("--synthetic", action="store_true", help="generate the stream instead of recording one")
    ap.add_argument("--file", type=Path, help="parse this recorded main channel instead")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    try:
        if a.file:
            path, source = a.file, f"file {a.file}"
        elif a.synthetic or not shutil.which(a.qemu) and os.sep not in a.qemu:
            path = tmp / "stream.bin"
            path.write_bytes(synthetic_stream(a.mem))
            source = f"synthetic stream ({a.mem} MiB of full pages)"
        else:
            path = record_stream(a.qemu, a.mem, tmp)
            source = f"stream recorded from {a.qemu} ({a.mem} MiB guest, random RAM)"
        data = path.read_bytes()
        print(f"{source}: {len(data)} bytes, chunks of {a.chunk} bytes, best of {a.repeat}")
        modes = [("counts only", {}), ("on_page", {"on_page": None}),
                 ("on_page+content", {"on_page": None, "content": True}), ("no copies", {"xbzrle": False}),
                 ("full copies", {"xbzrle": True})]
        for label, kw in modes:
            best = None
            for _ in range(a.repeat):
                if "on_page" in kw:
                    kw = dict(kw, on_page=Counter())
                dt, s = feed_all(data, a.chunk, **kw)
                best = dt if best is None else min(best, dt)
            pages = s.records["page"]
            extra = f", {kw['on_page'].n} PageRecords" if "on_page" in kw else ""
            print(f"  {label:<15} {len(data) / best / 1e9:6.2f} GB/s  ({best:.3f} s, {pages} full pages, "
                  f"{s.records['zero']} zero{extra})")
        best = None
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            parse_file(path)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        print(f"  {'parse_file':<15} {len(data) / best / 1e9:6.2f} GB/s  ({best:.3f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
