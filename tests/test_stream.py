"""The migration stream parser (verifier.analysis.stream) and `dirtylog stream`, on streams that real
QEMUs (Debian's 7.2 and the patched 10.0 of builder.qemu_build) write while migrating a guest.

No kernel is booted: `-machine virt -S -device loader,file=PAGES,addr=...` plants known bytes in
guest RAM and the CPU never runs, so one pass sends every page exactly once (planted and DTB pages
as PAGE records, the rest as ZERO records) and the source's RAM afterwards (QMP pmemsave) is the
oracle for every page. XBZRLE needs pages that change between passes: the test writes them through
the gdbstub (which marks them dirty for the migration) at chosen points of the migration, and
pause-before-switchover holds it before its final stage for one more change. Multifd channels are
separate connections: a unix socket listener in the test records each one to its own file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from verifier.analysis.stream import (MultifdChannelParser, PageRecord, PreemptChannelParser, StreamFormatError,
                                      StreamParser, StreamSummary)
from verifier.analysis.stream_files import parse_file, parse_files, sniff
from verifier.errors import InputError

REPO = Path(__file__).resolve().parent.parent
PS = 4096
RAM_BASE = 0x40000000  # virt
RAM_BLOCK = "mach-virt.ram"
MEM_MB = 64
PLANT_AT = 16 << 20  # offset of the planted pages in the RAM block (the DTB is at the bottom)
PLANTED = [0, 1, 2, 5, 9, 100, 101, 255]  # page indexes from PLANT_AT
MIGRATION_TIMEOUT = 60


# ============================================================================ QEMUs

def _qemu72():
    from verifier.run.qemu import probe_qemu
    path = shutil.which("qemu-system-arm")
    if not path:
        pytest.skip("no qemu-system-arm on PATH (Debian's QEMU 7.2: scripts/setup-host.sh)")
    q = probe_qemu(path)
    if q.version[:2] != (7, 2):
        pytest.skip(f"the qemu-system-arm on PATH is {q.version_str}, not Debian's 7.2")
    return q


def _qemu100():
    """The patched QEMU 10.0 (builder.qemu_build: built once, then reused from the cache)."""
    from builder import qemu_build
    from builder.cache import Cache
    from verifier.run.qemu import probe_qemu
    return probe_qemu(str(qemu_build.build_patched_qemu("10.0", Cache()).qemu_system_arm))


@pytest.fixture(params=["7.2", pytest.param("10.0", marks=pytest.mark.build)], scope="module")
def qemu(request):
    return _qemu72() if request.param == "7.2" else _qemu100()


@pytest.fixture(scope="module")
def any_qemu():
    """Whichever QEMU is here (7.2 first), for the tests that are about the parser's errors."""
    try:
        return _qemu72()
    except pytest.skip.Exception:
        return _qemu100()


# ============================================================================ harness

def planted_page(i: int) -> bytes:
    rng = random.Random(i)
    body = bytearray(rng.randbytes(PS))
    body[:16] = f"planted-{i:08d}".encode()
    return bytes(body)


def write_planted(path: Path) -> dict[int, bytes]:
    """The loader file: PLANTED pages (random content) with zero pages between them."""
    span = (max(PLANTED) + 1) * PS
    data = bytearray(span)
    pages = {}
    for i in PLANTED:
        pages[PLANT_AT + i * PS] = planted_page(i)
        data[i * PS:(i + 1) * PS] = pages[PLANT_AT + i * PS]
    path.write_bytes(data)
    return pages


def guest_args(loaders: list[str], machine: str = "virt", extra=()) -> list[str]:
    args = ["-machine", machine, "-accel", "tcg", "-cpu", "cortex-a15", "-m", str(MEM_MB), "-smp", "1",
            "-display", "none", "-nodefaults", "-S", *extra]
    for spec in loaders:
        args += ["-device", f"loader,{spec}"]
    return args


def wait_migration(q, timeout: float = MIGRATION_TIMEOUT, during=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = q.qmp("query-migrate")
        if st.get("status") == "completed":
            return st
        if st.get("status") in ("failed", "cancelled"):
            raise AssertionError(f"migration {st.get('status')}: {st.get('error-desc')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"migration did not complete within {timeout} s: {st}")
        if during is not None:
            during(st)
        time.sleep(0.02)


def migrate(qemu, wd: Path, args: list[str], uri: str, caps=(), params=None, after=None) -> dict:
    """Run one source QEMU, migrate it to `uri`, call after(q) once completed (the source is paused)."""
    from verifier.run.qemu import QemuProcess
    with QemuProcess(qemu, args, wd, "src") as q:
        if caps:
            q.qmp("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
        if params:
            q.qmp("migrate-set-parameters", **params)
        q.qmp("migrate", uri=uri)
        st = wait_migration(q)
        if after is not None:
            after(q)
        return st


def pmemsave(q, wd: Path, offset: int, size: int) -> bytes:
    out = wd / f"pmem-{offset:x}.bin"
    q.qmp("pmemsave", val=RAM_BASE + offset, size=size, filename=str(out))
    deadline = time.monotonic() + 10
    while not (out.exists() and out.stat().st_size == size):
        assert time.monotonic() < deadline, "pmemsave wrote nothing"
        time.sleep(0.02)
    return out.read_bytes()


def feed_in_chunks(parser, data: bytes):
    """Feed 3000 chunks of 1 byte, 3000 of 7, 3000 of 4093 (never aligned to a record), then 1 MiB ones."""
    pos = 0
    for size, count in ((1, 3000), (7, 3000), (4093, 3000), (1 << 20, len(data))):
        for _ in range(count):
            if pos >= len(data):
                return parser.close()
            parser.feed(data[pos:pos + size])
            pos += size
    return parser.close()


class ChannelRecorder:
    """A unix socket a source migrates to: every accepted connection is written to its own file."""

    def __init__(self, wd: Path):
        self.path = wd / "mig.sock"
        assert len(str(self.path)) < 100, f"socket path too long for sun_path: {self.path}"
        self.wd = wd
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(self.path))
        self.srv.listen(16)
        self.srv.settimeout(0.2)
        self.files: list[Path] = []
        self.threads: list[threading.Thread] = []
        self.stop = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self):
        while not self.stop:
            try:
                conn, _ = self.srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            f = self.wd / f"conn-{len(self.files)}.bin"
            self.files.append(f)
            t = threading.Thread(target=self._record, args=(conn, f), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _record(conn, path):
        with conn, open(path, "wb") as out:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    return
                out.write(data)

    def close(self) -> list[Path]:
        """After the migration: every channel was accepted; wait until QEMU has closed each one."""
        self.stop = True
        self.acceptor.join(5)
        self.srv.close()
        for t in self.threads:
            t.join(20)
            assert not t.is_alive(), "a migration channel is still open"
        return list(self.files)


def ram_records(records, block=RAM_BLOCK):
    return [r for r in records if r.block == block]


def stream_command(files, tmp_path: Path) -> tuple[str, list[dict]]:
    """`dirtylog stream FILES --json` through click's runner: its text and its channels (in the order given),
    each channel's pages per iteration adding up to its record counts."""
    import click
    from dirtylog.cli_stream import register

    @click.group()
    def group():
        pass

    register(group)
    out = tmp_path / "stream.json"
    res = CliRunner().invoke(group, ["stream", *map(str, files), "--json", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    chans = json.loads(out.read_text())["channels"]
    assert [c["path"] for c in chans] == [str(f) for f in files]
    for c in chans:
        assert c["complete"], c
        keys = {"main": ("page", "zero", "xbzrle"), "multifd": ("multifd", "multifd-zero"),
                "preempt": ("page", "zero")}[c["kind"]]
        for k in keys:
            assert sum(it[k] for it in c["iterations"]) == c["records"][k], (c["channel"], k)
        assert f"{c['path']}: " in res.output
    return res.output, chans


# ============================================================================ a paused guest, one pass

@pytest.fixture(scope="module")
def paused_stream(qemu, tmp_path_factory):
    """A paused guest with planted pages, migrated to a file; its RAM afterwards; the QEMU."""
    wd = tmp_path_factory.mktemp(f"paused-{qemu.version_str}")
    planted = write_planted(wd / "pages.bin")
    out = wd / "main.bin"
    ram = {}
    migrate(qemu, wd, guest_args([f"file={wd / 'pages.bin'},addr=0x{RAM_BASE + PLANT_AT:x}"]),
            f"exec:cat > {out}", after=lambda q: ram.update(data=pmemsave(q, wd, 0, MEM_MB << 20)))
    return {"path": out, "data": out.read_bytes(), "planted": planted, "ram": ram["data"], "qemu": qemu}


def test_paused_guest_every_page_once_planted_pages_with_their_heads(paused_stream):
    data, planted, ram = paused_stream["data"], paused_stream["planted"], paused_stream["ram"]
    records = []
    s = feed_in_chunks(StreamParser(on_page=records.append), data)

    assert s.complete and s.stream_version == 3 and s.page_size == PS
    assert s.machine.startswith("virt")
    blocks = {b["name"]: b["size"] for b in s.ram_blocks}
    assert blocks[RAM_BLOCK] == MEM_MB << 20
    # every page of every block exactly once, in the first iteration
    for name, size in blocks.items():
        offs = sorted(r.offset for r in records if r.block == name)
        assert offs == list(range(0, size, PS)), name
    # one pass, but it may span several RAM sections (each ram_save_iterate call sends for ~50 ms at most)
    its = [r.iteration for r in records]
    assert its == sorted(its) and {r.channel for r in records} == {"main"}
    assert [sum(x[k] for k in ("page", "zero", "xbzrle")) for x in s.iterations[:its[-1] + 1]] == \
        [its.count(i) for i in range(its[-1] + 1)]
    by_off = {r.offset: r for r in ram_records(records)}
    for off, content in planted.items():
        assert by_off[off].kind == "page" and by_off[off].head == content[:40], hex(off)
    # the source's RAM afterwards decides every other page: non-zero pages are PAGE records with their
    # first 40 bytes, all others ZERO records without a head
    for off in range(0, MEM_MB << 20, PS):
        page = ram[off:off + PS]
        r = by_off[off]
        if page.count(0) == PS:
            assert (r.kind, r.head) == ("zero", None), hex(off)
        else:
            assert (r.kind, r.head) == ("page", page[:40]), hex(off)
    nonzero = sum(1 for r in ram_records(records) if r.kind == "page")
    assert nonzero >= len(planted)
    # stream_offset is where the record's be64 header is, and the header holds the offset
    for r in records[:2000:37] + [by_off[o] for o in planted]:
        hdr = struct.unpack_from(">Q", data, r.stream_offset)[0]
        assert hdr & ~(PS - 1) == r.offset
        assert hdr & (PS - 1) & ~0x20 == (0x08 if r.kind == "page" else 0x02)
    # content=True: on_page(record, content), the page as sent (a view valid during the call)
    contents = {}

    def with_content(r, content):
        if r.block == RAM_BLOCK:
            contents[r.offset] = None if content is None else bytes(content)

    p = StreamParser(on_page=with_content, content=True)
    feed_in_chunks(p, data)
    assert dict(p.blocks) == blocks
    for off in range(0, MEM_MB << 20, PS):
        page = ram[off:off + PS]
        assert contents[off] == (None if page.count(0) == PS else page), hex(off)
    # summary counts agree with the records
    assert s.records["page"] == sum(1 for r in records if r.kind == "page")
    assert s.records["zero"] == sum(1 for r in records if r.kind == "zero")
    assert sum(x["page"] for x in s.iterations) == s.records["page"] and s.records["xbzrle"] == 0


def test_paused_guest_device_sections_and_vmdescription(paused_stream):
    s = parse_files([paused_stream["path"]])[0]
    assert s.path == str(paused_stream["path"]) and s.bytes == len(paused_stream["data"])
    assert s.section_footers is True
    names = [d["name"] for d in s.device_sections]
    assert "cpu" in names and "timer" in names and names[-1] == "globalstate"
    assert all(d["type"] == "FULL" and d["size"] > 0 for d in s.device_sections)
    # the VMDESCRIPTION is parsed, and every device body found by its footer has the size QEMU recorded
    assert s.vmdescription and [d["name"] for d in s.vmdesc["devices"]] == names
    assert s.vmdesc_checked == len(names)
    assert s.ram_sections >= 2  # START (setup) + at least the END
    d = s.to_dict()
    json.dumps(d)
    assert d["iteration_count"] == len(d["iterations"]) and d["records"]["page"] == s.records["page"]
    major = paused_stream["qemu"].version[0]
    # the version table: SWITCHOVER_START is a 10.0 command, 7.2 has none
    assert ("switchover-start" in s.features) == (major >= 10), s.features
    assert s.machine == f"virt-{paused_stream['qemu'].version[0]}.{paused_stream['qemu'].version[1]}"


def test_same_records_whatever_the_chunking(paused_stream):
    data = paused_stream["data"]
    a, b = [], []
    p = StreamParser(on_page=a.append)
    p.feed(data)
    sa = p.close()
    p = StreamParser(on_page=b.append)
    rng = random.Random(7)
    pos = 0
    while pos < len(data):
        n = rng.choice((1, 2, 3, 8, 9, 40, 4095, 4096, 4097, 8200, 100000))
        p.feed(memoryview(data)[pos:pos + n])
        pos += n
    sb = p.close()
    assert a == b
    assert sa.to_dict() == sb.to_dict()


def test_file_or_exec_uri_stream_read_by_dirtylog_stream(qemu, tmp_path):
    """A precopy stream written by QEMU itself: file: on 10.0; 7.2 has no file: migration, so exec: with
    the stream through dd (another writer than the paused_stream fixture's cat). `dirtylog stream`
    then reads it: every page of the guest once in its pages per iteration."""
    planted = write_planted(tmp_path / "pages.bin")
    out = tmp_path / "file-uri.bin"
    uri = f"file:{out}" if qemu.version[0] >= 10 else f"exec:dd of={out} bs=1M status=none"
    migrate(qemu, tmp_path, guest_args([f"file={tmp_path / 'pages.bin'},addr=0x{RAM_BASE + PLANT_AT:x}"]), uri)
    records = []
    p = StreamParser(on_page=records.append)
    s = feed_in_chunks(p, out.read_bytes())
    assert s.complete and s.vmdescription
    by_off = {r.offset: r for r in ram_records(records)}
    assert len(by_off) == (MEM_MB << 20) // PS
    for off, content in planted.items():
        assert by_off[off].head == content[:40]
    text, (chan,) = stream_command([out], tmp_path)
    assert chan["records"] == s.records and chan["iterations"] == s.iterations
    assert chan["records"]["page"] + chan["records"]["zero"] == len(records)
    assert chan["machine"] == f"virt-{qemu.version[0]}.{qemu.version[1]}" and "complete (QEMU_VM_EOF)" in text


def test_vexpress_one_kib_target_pages(qemu, tmp_path):
    """vexpress-a15 sets no minimum page size, so its configuration has no target-page-bits and QEMU uses
    the ARM minimum, 1 KiB: the parser must be told (page_size=1024); parse_files finds it out itself."""
    base, block = 0x80000000, "vexpress.highmem"
    planted = write_planted(tmp_path / "pages.bin")
    machine, extra = "vexpress-a15", ["-audiodev", "none,id=snd"]
    if qemu.version[:2] >= (8, 2):
        machine += ",audiodev=snd"
    out = tmp_path / "vexpress.bin"
    ram = {}
    migrate(qemu, tmp_path, guest_args([f"file={tmp_path / 'pages.bin'},addr=0x{base + PLANT_AT:x}"], machine, extra),
            f"exec:cat > {out}", after=lambda q: ram.update(
                data=pmemsave(q, tmp_path, base - RAM_BASE, MEM_MB << 20)))
    data = out.read_bytes()
    with pytest.raises(StreamFormatError, match=r"unknown RAM flag bits 0x400 .*page_size=1024"):
        StreamParser().feed(data)
    records = []
    s = feed_in_chunks(StreamParser(on_page=records.append, page_size=1024), data)
    assert s.page_size == 1024 and s.machine == "vexpress-a15" and s.vmdesc_checked == len(s.device_sections)
    by_off = {r.offset: r for r in records if r.block == block}
    assert sorted(by_off) == list(range(0, MEM_MB << 20, 1024))
    for off in range(0, MEM_MB << 20, 1024):
        page = ram["data"][off:off + 1024]
        assert (by_off[off].kind, by_off[off].head) == (("zero", None) if page.count(0) == 1024 else
                                                        ("page", page[:40])), hex(off)
    for off, content in planted.items():
        for k in range(4):  # one 4 KiB planted page is four 1 KiB target pages
            assert by_off[off + k * 1024].head == content[k * 1024:k * 1024 + 40]
    again = parse_files([out])[0]
    assert again.page_size == 1024 and again.records == s.records


def test_vexpress_stream_whose_first_record_is_a_full_page(qemu, tmp_path):
    """Read at 4096, a 1 KiB-page stream whose first RAM record is a full page loses step inside that
    page's data, wherever its bytes put it (a recorded 7.2 trial stopped on zeros read as flags 0x0,
    its first page being the boot code): parse_files tries the smaller sizes after any error."""
    base = 0x80000000
    (tmp_path / "first.bin").write_bytes(b"\xab" * 1024)
    machine, extra = "vexpress-a15", ["-audiodev", "none,id=snd"]
    if qemu.version[:2] >= (8, 2):
        machine += ",audiodev=snd"
    out = tmp_path / "vexpress.bin"
    migrate(qemu, tmp_path, guest_args([f"file={tmp_path / 'first.bin'},addr=0x{base:x}"], machine, extra),
            f"exec:cat > {out}")
    with pytest.raises(StreamFormatError):
        StreamParser().feed(out.read_bytes())
    records = []
    s = parse_file(out)
    assert s.page_size == 1024 and s.complete
    feed_in_chunks(StreamParser(on_page=records.append, page_size=1024), out.read_bytes())
    first = next(r for r in records if r.block == "vexpress.highmem" and r.offset == 0)
    assert (first.kind, first.head) == ("page", b"\xab" * 40)
    res = run_cli("stream", out)
    assert res.returncode == 0 and "page size 1024" in res.stdout, res.stdout + res.stderr


def test_x_ignore_shared_blocks_carry_their_address(qemu, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm for a shared memory backend")
    mem = shm / f"dirtylog-test-stream-{os.getpid()}-{qemu.version_str}"
    out = tmp_path / "ignore-shared.bin"
    try:
        migrate(qemu, tmp_path, ["-machine", "virt,memory-backend=m0", "-object",
                                 f"memory-backend-file,id=m0,size={MEM_MB}M,mem-path={mem},share=on",
                                 *guest_args([])[2:]],
                f"exec:cat > {out}", caps=["x-ignore-shared"])
    finally:
        mem.unlink(missing_ok=True)
    records = []
    s = feed_in_chunks(StreamParser(on_page=records.append), out.read_bytes())
    assert s.capabilities == ["x-ignore-shared"]
    blocks = {b["name"]: b for b in s.ram_blocks}
    assert blocks["m0"]["addr"] == RAM_BASE and all("addr" in b for b in s.ram_blocks)
    assert not [r for r in records if r.block == "m0"], "a shared block is not migrated"
    assert {r.block for r in records} == set(blocks) - {"m0"}


# ============================================================================ XBZRLE, pages changed by us

N_DIRTY = 256
DIRTY_AT = 16 << 20


def dirty_page_template(i: int) -> bytes:
    page = bytearray(PS)
    page[4:40] = b"X" * 36
    page[100:200] = bytes([i & 0xFF]) * 100
    return bytes(page)


def test_xbzrle_decoded_pages_match_the_source(qemu, tmp_path):
    """The guest stays paused; the test changes the first word of 256 pages through the gdbstub (QEMU marks
    them dirty for the migration) while the bulk pass runs, again once the second pass sent them whole
    (which put them in the XBZRLE cache; the test knows by parsing the stream while QEMU writes it), and
    again while the migration waits before the switchover (pause-before-switchover). So a page goes PAGE,
    PAGE, XBZRLE in the third pass and XBZRLE in the final stage, that one decoded against a base that was
    itself decoded."""
    from verifier.capture.cpustate import GdbStub
    from verifier.run.qemu import QemuProcess
    (tmp_path / "pages.bin").write_bytes(b"".join(dirty_page_template(i) for i in range(N_DIRTY)))
    out = tmp_path / "xbzrle.bin"
    args = guest_args([f"file={tmp_path / 'pages.bin'},addr=0x{RAM_BASE + DIRTY_AT:x}"])
    whole: dict[int, int] = {}  # offset -> PAGE records seen so far, by reading the stream while QEMU writes it
    live = StreamParser(on_page=lambda r: whole.__setitem__(r.offset, whole.get(r.offset, 0) + 1)
                        if r.kind == "page" and r.block == RAM_BLOCK else None)
    changed: dict[int, int] = {}  # page index -> the value last written

    def write(gdb, i: int, value: int) -> None:
        word = value.to_bytes(4, "little").hex()
        assert gdb.command(f"M{RAM_BASE + DIRTY_AT + i * PS:x},4:{word}") == b"OK"
        changed[i] = value

    with QemuProcess(qemu, args, tmp_path, "src", gdb=True) as q, GdbStub(tmp_path / q.gdb_path.name) as gdb:
        q.qmp("migrate-set-capabilities", capabilities=[{"capability": c, "state": True}
                                                        for c in ("xbzrle", "pause-before-switchover")])
        # 2 MiB/s: the bulk pass (1.5 MB) and the second one (1 MiB of whole pages) last long enough
        q.qmp("migrate-set-parameters", **{"max-bandwidth": 2 << 20, "downtime-limit": 100})
        q.qmp("migrate", uri=f"exec:cat > {out}")
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        paused = False
        while True:
            st = q.qmp("query-migrate")
            status, syncs = st.get("status"), (st.get("ram") or {}).get("dirty-sync-count", 0)
            if status == "completed":
                break
            assert status in ("setup", "active", "pre-switchover", "device"), st
            assert time.monotonic() < deadline, st
            if out.exists():
                with open(out, "rb") as f:
                    f.seek(live.bytes_fed)
                    live.feed(f.read())
            for i in range(N_DIRTY):
                sent = whole.get(DIRTY_AT + i * PS, 0)
                if status == "active" and syncs >= 1 and i not in changed:
                    write(gdb, i, 1)  # dirty for the second pass, which sends it whole into the XBZRLE cache
                elif sent >= 2 and changed.get(i) == 1:
                    write(gdb, i, 2)  # the second pass sent it: the third sends it as XBZRLE
            if status == "pre-switchover" and not paused:
                for i in range(N_DIRTY):
                    write(gdb, i, 3)  # for the final stage
                paused = True
                q.qmp("migrate-continue", state="pre-switchover")
            time.sleep(0.005)
        assert paused and set(changed.values()) == {3}
        assert st["xbzrle-cache"]["pages"] > 0, st
        final = pmemsave(q, tmp_path, DIRTY_AT, N_DIRTY * PS)

    data = out.read_bytes()
    seen: dict[int, list[tuple[PageRecord, bytes]]] = {}
    every = []
    holder = {}

    def keep(r):
        every.append(r)
        if r.block == RAM_BLOCK and DIRTY_AT <= r.offset < DIRTY_AT + N_DIRTY * PS:
            seen.setdefault(r.offset, []).append((r, holder["p"].page_content(r.block, r.offset)))

    full = holder["p"] = StreamParser(on_page=keep, xbzrle=True)
    s = feed_in_chunks(full, data)
    assert s.records["xbzrle"] > 0 and "xbzrle" in s.features
    xb = [r for recs in seen.values() for r, _ in recs if r.kind == "xbzrle"]
    assert xb and all(r.iteration > 0 for r in xb)
    # XBZRLE in the final stage for every page, and twice for most: decoded against a base that was
    # itself decoded (not for the last pages of the second pass, read from the file after it ended)
    twice = [off for off, recs in seen.items() if sum(1 for r, _ in recs if r.kind == "xbzrle") >= 2]
    assert all(recs[-1][0].kind == "xbzrle" for recs in seen.values())
    assert len(twice) >= N_DIRTY // 2, sorted({tuple((r.kind, r.iteration, int.from_bytes(c[:4], "little"))
                                                     for r, c in recs) for recs in seen.values()})[:6]
    for i in range(N_DIRTY):
        off = DIRTY_AT + i * PS
        template = dirty_page_template(i)
        recs = seen[off]
        assert recs[0][0].kind == "page", "a page is first sent whole"
        counters = []
        for r, content in recs:
            assert r.head == content[:40]
            # only the first word changed: the rest is what the loader planted
            assert content[4:] == template[4:], (hex(off), r)
            counters.append(int.from_bytes(content[:4], "little"))
        assert counters == sorted(counters) and counters[-1] == 3, (hex(off), counters)
        # what the destination would hold at the end is what the source's RAM held
        assert recs[-1][1] == final[i * PS:(i + 1) * PS], (hex(off), recs[-1][0])

    # content=True with xbzrle=True: the decoded page itself
    xcontent = {}
    feed_in_chunks(StreamParser(on_page=lambda r, c: xcontent.__setitem__((r.block, r.offset), c), content=True,
                                xbzrle=True), data)
    for i in range(N_DIRTY):
        assert xcontent[(RAM_BLOCK, DIRTY_AT + i * PS)] == final[i * PS:(i + 1) * PS]
    # the default parser keeps only 40-byte heads, and gives the same records
    heads = []
    s2 = feed_in_chunks(StreamParser(on_page=heads.append), data)
    assert heads == every
    assert s2.records == s.records
    # parse_files decodes it too, and `dirtylog stream` prints the xbzrle pages per iteration
    assert parse_files([out])[0].records["xbzrle"] == s.records["xbzrle"]
    text, (chan,) = stream_command([out], tmp_path)
    assert chan["records"] == s.records and chan["iterations"] == s.iterations and "xbzrle" in chan["features"]
    assert f"{s.records['xbzrle']} xbzrle pages" in text
    # without page copies an XBZRLE record cannot be decoded: a typed error, not a skip
    with pytest.raises(StreamFormatError, match=r"XBZRLE page .* at stream offset \d+"):
        feed_in_chunks(StreamParser(xbzrle=False), data)


# ============================================================================ multifd, two channels

def test_multifd_two_channels_cover_every_page(qemu, tmp_path):
    planted = write_planted(tmp_path / "pages.bin")
    rec = ChannelRecorder(tmp_path)
    try:
        migrate(qemu, tmp_path, guest_args([f"file={tmp_path / 'pages.bin'},addr=0x{RAM_BASE + PLANT_AT:x}"]),
                f"unix:{rec.path}", caps=["multifd"], params={"multifd-channels": 2})
    finally:
        files = rec.close()
    assert len(files) == 3, files
    kinds = {f: sniff(f) for f in files}
    assert sorted(kinds.values()) == ["main", "multifd", "multifd"]

    records = []
    summaries = {}
    main_summary = None
    for f in sorted(files, key=lambda f: kinds[f] != "main"):
        if kinds[f] == "main":
            p = StreamParser(on_page=records.append)
        else:
            p = MultifdChannelParser(on_page=records.append, page_size=main_summary.page_size,
                                     blocks={b["name"]: b["size"] for b in main_summary.ram_blocks})
        summaries[f] = feed_in_chunks(p, f.read_bytes())
        if kinds[f] == "main":
            main_summary = summaries[f]
    channels = sorted(s.channel for s in summaries.values())
    assert channels == ["main", "multifd-0", "multifd-1"]
    assert {s.multifd_id for s in summaries.values() if s.kind == "multifd"} == {0, 1}

    # every page of the RAM block exactly once, over all channels
    by_off: dict[int, PageRecord] = {}
    for r in ram_records(records):
        assert r.offset not in by_off, (r, by_off.get(r.offset))
        by_off[r.offset] = r
    assert sorted(by_off) == list(range(0, MEM_MB << 20, PS))
    for off, content in planted.items():
        r = by_off[off]
        assert r.kind == "multifd" and r.channel.startswith("multifd-") and r.head == content[:40]
    data = {s.channel: f.read_bytes() for f, s in summaries.items()}
    for off in planted:  # stream_offset of a multifd page is where its data is in that channel
        r = by_off[off]
        assert data[r.channel][r.stream_offset:r.stream_offset + 40] == r.head
    zero_kinds = {r.kind for r in by_off.values() if r.head is None}
    if qemu.version[0] >= 10:
        # zero-page-detection=multifd: zero pages are offsets in the multifd packets
        assert zero_kinds == {"multifd-zero"}
        assert "multifd-flush" in main_summary.features and main_summary.records["multifd_flush"] > 0
    else:
        # 7.2: zero pages go on the main channel
        assert zero_kinds == {"zero"}
        assert main_summary.records["multifd_flush"] == 0
    assert main_summary.records["page"] == 0  # no full page on the main channel with multifd
    for s in summaries.values():
        if s.kind == "multifd":
            assert s.complete and s.sync_packets >= 2 and s.packets >= s.sync_packets
    # content=True and the iteration of another channel (as a live tap gives the main channel's)
    got = {}
    chan = next(f for f in files if kinds[f] == "multifd")
    p = MultifdChannelParser(on_page=lambda r, c: got.__setitem__(r.offset, (r, None if c is None else bytes(c))),
                             content=True, iteration=lambda: 7)
    feed_in_chunks(p, chan.read_bytes())
    assert got and {r.iteration for r, _ in got.values()} == {7}
    for off, (r, c) in got.items():
        assert (c is None) == (r.kind == "multifd-zero")
        if off in planted and r.block == RAM_BLOCK:
            assert c == planted[off]
    # parse_files finds the kinds by themselves and gives the same counts
    again = {s.channel: s for s in parse_files(files)}
    for s in summaries.values():
        assert again[s.channel].records == s.records
    # and so does `dirtylog stream` on all three channels: every page of the guest once
    text, chans = stream_command(files, tmp_path)
    assert sorted(c["channel"] for c in chans) == ["main", "multifd-0", "multifd-1"]
    for c in chans:
        assert c["records"] == summaries[Path(c["path"])].records
    assert sum(c["records"]["multifd"] for c in chans if c["kind"] == "multifd") == \
        sum(1 for r in records if r.kind == "multifd")
    assert text.count(": multifd channel ") == 2


# ============================================================================ postcopy with preempt

def _be64(buf, at: int) -> int:
    return struct.unpack_from(">Q", buf, at)[0]


ASKED_AT = 48 << 20  # pages the destination reads during postcopy (the main channel is far below then)
ASKED = 16
SLOW_AT = 8 << 20  # 2 MiB of random pages: at 1 MB/s the main channel is still there when postcopy runs


@pytest.mark.root  # postcopy's userfaultfd needs CAP_SYS_PTRACE while vm.unprivileged_userfaultfd is 0
def test_postcopy_preempt_streams_read_by_dirtylog_stream(qemu, tmp_path):
    """Postcopy with postcopy-preempt between two real QEMUs through the stream tap (recording): the
    source at 1 MB/s is still in the low random pages when postcopy starts; the paused destination
    then reads 16 pages high up (pmemsave), which faults and asks for them over the return path, and
    the source sends them urgently (10.0: all on the preempt channel; 7.2: some there, the rest on
    main). `dirtylog stream` reads both recorded channels, and together they hold every page of
    the guest exactly once, as the source has it."""
    from verifier.run.qemu import QemuProcess
    from verifier.run.streamtap import StreamTap
    rng = random.Random(15)
    slow, asked = rng.randbytes(2 << 20), rng.randbytes(ASKED * PS)
    (tmp_path / "slow.bin").write_bytes(slow)
    (tmp_path / "asked.bin").write_bytes(asked)
    src_args = guest_args([f"file={tmp_path / 'slow.bin'},addr=0x{RAM_BASE + SLOW_AT:x}",
                           f"file={tmp_path / 'asked.bin'},addr=0x{RAM_BASE + ASKED_AT:x}"])
    caps = [{"capability": c, "state": True} for c in ("postcopy-ram", "postcopy-preempt")]
    with QemuProcess(qemu, src_args, tmp_path, "src") as src, \
            QemuProcess(qemu, guest_args([], extra=["-incoming", "defer"]), tmp_path, "dst") as dst:
        for side in (src, dst):
            side.qmp("migrate-set-capabilities", capabilities=caps)
        src.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 20, "max-postcopy-bandwidth": 1 << 20})
        with StreamTap(f"unix:{tmp_path / 'tap.sock'}", f"unix:{tmp_path / 'dst.sock'}", tmp_path,
                       ram_block_bytes=MEM_MB << 20, record=True, page_size=PS) as tap:
            dst.qmp("migrate-incoming", uri=f"unix:{tmp_path / 'dst.sock'}")
            src.qmp("migrate", uri=tap.listen_uri)
            time.sleep(0.3)
            src.qmp("migrate-start-postcopy")
            deadline = time.monotonic() + MIGRATION_TIMEOUT
            while src.qmp("query-migrate")["status"] != "postcopy-active":
                assert time.monotonic() < deadline, src.qmp("query-migrate")
                time.sleep(0.02)
            got = pmemsave(dst, tmp_path, ASKED_AT, ASKED * PS)  # faults: the pages are asked for
            src.qmp("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
            wait_migration(src)
            while dst.qmp("query-migrate").get("status") != "completed":
                assert time.monotonic() < deadline, dst.qmp("query-migrate")
                time.sleep(0.02)
        ram = pmemsave(src, tmp_path, 0, MEM_MB << 20)
    assert got == asked
    assert tap.errors == {}
    files = [tmp_path / "stream-main.bin", tmp_path / "stream-preempt.bin"]
    assert [sniff(f) for f in files] == ["main", "preempt"]
    text, (main, preempt) = stream_command(files, tmp_path)

    # the postcopy commands, once each; no VMDESCRIPTION (postcopy sends none)
    for cmd in ("POSTCOPY_ADVISE", "POSTCOPY_LISTEN", "POSTCOPY_RUN", "PACKAGED"):
        assert main["commands"].get(cmd) == 1, main["commands"]
    assert main["commands"].get("POSTCOPY_RAM_DISCARD", 0) >= 1 and main["postcopy_ram"]
    assert "packaged" in main["features"] and not main["vmdescription"]
    assert len(main["iterations"]) >= 2  # precopy sections, then postcopy's
    # the preempt channel: pages of the asked-for range only; 7.2 ends it with an EOS, 10.0 does not
    assert preempt["kind"] == "preempt" and [b["name"] for b in preempt["ram_blocks"]] == [RAM_BLOCK]
    assert preempt["records"]["eos"] == (1 if qemu.version[0] < 10 else 0), preempt
    n = preempt["records"]["page"]
    assert (n == ASKED) if qemu.version[0] >= 10 else (1 <= n <= ASKED), preempt
    assert "postcopy-preempt channel" in text and f"{n} full pages, 0 zero pages" in text

    # every page of the guest's RAM exactly once over both channels, with the source's content
    records: list[PageRecord] = []
    feed_in_chunks(StreamParser(on_page=records.append), files[0].read_bytes())
    blocks = {b["name"]: b["size"] for b in main["ram_blocks"]}
    s = feed_in_chunks(PreemptChannelParser(on_page=records.append, blocks=blocks), files[1].read_bytes())
    assert s.records == preempt["records"]
    records = ram_records(records)
    by_off: dict[int, PageRecord] = {}
    for r in records:
        assert r.offset not in by_off, (r, by_off[r.offset])
        by_off[r.offset] = r
    assert sorted(by_off) == list(range(0, MEM_MB << 20, PS))
    for off, r in by_off.items():
        page = ram[off:off + PS]
        assert (r.kind == "zero") == (page == bytes(PS)), r
        if r.kind == "page":
            assert r.head == page[:40], r
    on_preempt = {off for off, r in by_off.items() if r.channel == "preempt"}
    assert len(on_preempt) == n and on_preempt <= set(range(ASKED_AT, ASKED_AT + ASKED * PS, PS))
    # the tap's ledger has them too, on the channel that carried them
    led = tap.ledger.summary()
    assert led["pages_sent"] == led["pages"] == (MEM_MB << 20) // PS and "preempt" in led["channels"]
    for off in range(ASKED_AT, ASKED_AT + ASKED * PS, PS):
        e = tap.ledger.entry(off // PS)
        assert (e.channel, e.stream_offset) == (by_off[off].channel, by_off[off].stream_offset)

    # bad preempt bytes: one typed error naming the flag and the offset, exit 2 from the command
    data = bytearray(files[1].read_bytes())
    last = max(r.stream_offset for r in records if r.channel == "preempt")
    struct.pack_into(">Q", data, last, _be64(data, last) | 0x40)  # XBZRLE: never sent there
    with pytest.raises(StreamFormatError, match=rf"XBZRLE.* on the postcopy-preempt channel .* at stream offset {last}"):
        feed_in_chunks(PreemptChannelParser(blocks=blocks), bytes(data))
    with pytest.raises(StreamFormatError, match=r"after the preempt channel's EOS"):
        feed_in_chunks(PreemptChannelParser(blocks=blocks), struct.pack(">Q", 0x10) + bytes(files[1].read_bytes()[:9]))
    bad = tmp_path / "bad-preempt.bin"
    bad.write_bytes(data)
    res = run_cli("stream", files[0], bad)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and f"at stream offset {last}" in res.stderr, res.stderr


# ============================================================================ bad input

@pytest.fixture(scope="module")
def recorded(any_qemu, tmp_path_factory):
    wd = tmp_path_factory.mktemp("recorded")
    write_planted(wd / "pages.bin")
    out = wd / "main.bin"
    migrate(any_qemu, wd, guest_args([f"file={wd / 'pages.bin'},addr=0x{RAM_BASE + PLANT_AT:x}"]),
            f"exec:cat > {out}")
    data = out.read_bytes()
    records = []
    p = StreamParser(on_page=records.append)
    p.feed(data)
    return {"path": out, "data": data, "records": records, "summary": p.close()}


def _truncated(data: bytes, at: int) -> StreamFormatError:
    p = StreamParser()
    p.feed(data[:at])
    with pytest.raises(StreamFormatError) as e:
        p.close()
    return e.value


def test_truncated_stream_names_what_and_where(recorded):
    data, records, s = recorded["data"], recorded["records"], recorded["summary"]
    page = next(r for r in records if r.kind == "page" and r.offset >= PLANT_AT)
    cpu = next(d for d in s.device_sections if d["name"] == "cpu")
    cpu_body = cpu["stream_offset"] + 14 + len("cpu")
    last = s.device_sections[-1]
    eof_at = last["stream_offset"] + 14 + len(last["name"]) + last["size"] + 5
    assert data[eof_at:eof_at + 2] == b"\x00\x06"  # QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION
    cuts = {
        "inside the file header": 5,
        "mid-page": page.stream_offset + 8 + 100,
        "mid-header": page.stream_offset + 3,
        "device body": cpu_body + 100,
        "before EOF": eof_at,
        "mid-VMDESCRIPTION header": eof_at + 3,
        "mid-VMDESCRIPTION": len(data) - 10,
    }
    for what, at in cuts.items():
        err = _truncated(data, at)
        assert "truncated" in str(err), (what, err)
        assert err.offset is not None and err.offset <= at, (what, err.offset, at)
        assert f"at stream offset {err.offset}" in str(err) and err.channel == "main"
        assert isinstance(err, InputError)
    err = _truncated(data, page.stream_offset + 8 + 100)
    assert err.offset == page.stream_offset and "RAM section" in str(err)
    err = _truncated(data, cpu_body + 100)
    assert "section" in str(err) and "(cpu)" in str(err) and err.offset == cpu_body
    err = _truncated(data, eof_at)
    assert "before QEMU_VM_EOF" in str(err)
    # up to QEMU_VM_EOF is a whole stream, one without a VMDESCRIPTION (as with suppress-vmdesc=on)
    for chunk in (1, 4093, len(data)):
        p = StreamParser()
        for i in range(0, eof_at + 1, chunk):
            p.feed(data[i:min(i + chunk, eof_at + 1)])
        short = p.close()
        assert short.complete and not short.vmdescription and short.vmdesc_checked == 0
        assert short.device_sections == s.device_sections and short.records == s.records
    with pytest.raises(StreamFormatError, match="empty stream"):
        StreamParser().close()


def test_truncated_multifd_channel(any_qemu, tmp_path):
    write_planted(tmp_path / "pages.bin")
    rec = ChannelRecorder(tmp_path)
    try:
        migrate(any_qemu, tmp_path, guest_args([f"file={tmp_path / 'pages.bin'},addr=0x{RAM_BASE + PLANT_AT:x}"]),
                f"unix:{rec.path}", caps=["multifd"], params={"multifd-channels": 2})
    finally:
        files = rec.close()
    chan = next(f for f in files if sniff(f) == "multifd")
    data = chan.read_bytes()
    for at in (10, 64 + 100, len(data) - 1):
        p = MultifdChannelParser()
        p.feed(data[:at])
        with pytest.raises(StreamFormatError, match=r"truncated .* at stream offset \d+") as e:
            p.close()
        assert e.value.offset <= at
    p = MultifdChannelParser()
    p.feed(data)
    assert p.close().complete
    # a main channel fed to the multifd parser and the reverse
    with pytest.raises(StreamFormatError, match="not a multifd channel .* at stream offset 0"):
        MultifdChannelParser().feed(b"QEVM\0\0\0\x03")
    with pytest.raises(StreamFormatError, match="not a QEMU migration stream .* at stream offset 0"):
        StreamParser().feed(data[:64])


def test_garbage_and_corrupted_records(recorded):
    data, records = recorded["data"], recorded["records"]
    with pytest.raises(StreamFormatError, match=r"not a QEMU migration stream .* at stream offset 0"):
        StreamParser().feed(os.urandom(1000))
    with pytest.raises(StreamFormatError, match=r"version 2 .* at stream offset 4"):
        StreamParser().feed(b"QEVM\0\0\0\x02")
    page = next(r for r in records if r.kind == "page" and r.offset >= PLANT_AT)
    zero = next(r for r in records if r.kind == "zero" and r.stream_offset > page.stream_offset)

    def corrupt(at: int, flags: int) -> bytes:
        b = bytearray(data)
        hdr = struct.unpack_from(">Q", b, at)[0]
        struct.pack_into(">Q", b, at, (hdr & ~(PS - 1)) | flags)
        return bytes(b)

    cases = [(page.stream_offset, 0x80 | 0x20, "RAM_SAVE_FLAG_HOOK"),
             (page.stream_offset, 0x100 | 0x20, "RAM_SAVE_FLAG_COMPRESS_PAGE"),
             (zero.stream_offset, 0x400 | 0x22, "unknown RAM flag bits 0x400"),
             (zero.stream_offset, 0x01 | 0x20, "RAM_SAVE_FLAG_FULL"),
             (page.stream_offset, 0x0A | 0x20, "invalid combination of RAM flags 0x2a")]
    for at, flags, name in cases:
        bad = corrupt(at, flags)
        for chunk in (len(bad), 4093):
            p = StreamParser()
            with pytest.raises(StreamFormatError) as e:
                for i in range(0, len(bad), chunk):
                    p.feed(bad[i:i + chunk])
                p.close()
            assert name in str(e.value) and e.value.offset == at, (name, str(e.value), at)
            assert f"at stream offset {at}" in str(e.value)
    # an unknown section type where a section starts
    dev = recorded["summary"].device_sections[2]
    bad = bytearray(data)
    bad[dev["stream_offset"]] = 0x42
    with pytest.raises(StreamFormatError, match=rf"unknown section type \(0x42\).* at stream offset {dev['stream_offset']}"):
        p = StreamParser()
        p.feed(bytes(bad))  # the footer before it is not taken for one: a device section never ends...
        p.close()  # ...and the end of the data says why
    # a zero page with a fill byte, a page beyond its block
    bad = bytearray(data)
    bad[zero.stream_offset + 8] = 7
    with pytest.raises(StreamFormatError, match=rf"fill byte 0x07 at stream offset {zero.stream_offset + 8}"):
        StreamParser().feed(bytes(bad))
    bad = bytearray(data)
    struct.pack_into(">Q", bad, page.stream_offset, (1 << 40) | 0x28)
    with pytest.raises(StreamFormatError, match=rf"beyond RAM block {RAM_BLOCK} .* at stream offset {page.stream_offset}"):
        StreamParser().feed(bytes(bad))
    # trailing bytes after the VMDESCRIPTION
    with pytest.raises(StreamFormatError, match=rf"trailing data .* at stream offset {len(data)}"):
        StreamParser().feed(data + b"\0")


# ============================================================================ the command

CLI = ("import sys, click\n"
       "from dirtylog.cli_stream import register\n"
       "from dirtylog.console import run_main\n"
       "g = click.Group()\n"
       "register(g)\n"
       "run_main(g, sys.argv[1:])\n")


def run_cli(*args):
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_stream_command_prints_the_summary_and_writes_json(recorded, tmp_path):
    out = tmp_path / "s.json"
    res = run_cli("stream", recorded["path"], "--json", out)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    s = recorded["summary"]
    assert f"QEMU migration stream version 3, machine {s.machine}" in text
    assert f"{s.bytes} bytes" in text and "complete (QEMU_VM_EOF)" in text
    assert f"iterations: {len(s.iterations)}" in text
    assert f"   0: {s.iterations[0]['page']} full, {s.iterations[0]['zero']} zero, 0 xbzrle" in text
    assert f"{RAM_BLOCK} 64 MiB" in text
    assert f"device sections: {len(s.device_sections)}" in text and " cpu instance 0 version " in text
    assert f"VMDESCRIPTION: present ({len(s.device_sections)} devices" in text
    doc = json.loads(out.read_text())
    assert doc["schema"] == "dirtylog-stream/1"
    assert doc["channels"][0]["records"] == s.records and doc["channels"][0]["vmdesc"]["devices"]


def test_stream_command_bad_input_is_one_line_and_exit_2(recorded, tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(4096))
    short = tmp_path / "short.bin"
    short.write_bytes(recorded["data"][:len(recorded["data"]) // 2])
    flagged = tmp_path / "flagged.bin"
    b = bytearray(recorded["data"])
    page = next(r for r in recorded["records"] if r.kind == "page")
    struct.pack_into(">Q", b, page.stream_offset, page.offset | 0x80)
    flagged.write_bytes(b)
    for path, words in [(tmp_path / "missing.bin", "no such file"), (garbage, "not a QEMU migration stream"),
                        (short, "truncated"), (flagged, "RAM_SAVE_FLAG_HOOK"), (tmp_path, "is a directory")]:
        res = run_cli("stream", recorded["path"], path)
        assert res.returncode == 2, (path, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dirtylog: error: ") and words in lines[0], res.stderr
        assert "Traceback" not in res.stderr
    res = run_cli("stream", flagged)
    assert f"at stream offset {page.stream_offset}" in res.stderr


def test_stream_command_through_click_runner(recorded):
    import click
    from dirtylog.cli_stream import register

    @click.group()
    def group():
        pass

    register(group)
    res = CliRunner().invoke(group, ["stream", str(recorded["path"])])
    assert res.exit_code == 0, res.output
    assert "VMDESCRIPTION: present" in res.output
    res = CliRunner().invoke(group, ["stream", str(recorded["path"]) + ".nope"])
    assert isinstance(res.exception, InputError) and not isinstance(res.exception, StreamFormatError)
    assert isinstance(StreamSummary(channel="main", kind="main").to_dict(), dict)
