"""Tests for the dirtyram guest workload (dirtyram-src/), built for real, no mocks.

The memory test decodes the live process's buffer per dirtyram-src/FORMAT.md and
checks every header field against an independent model of the write order, so it
pins the page-header contract that the comparator relies on.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "dirtyram-src"
ARM_CC = "arm-linux-gnueabihf-gcc"
PAGE = 4096
HDR = struct.Struct("<4sIIIQQII")  # FORMAT.md v1, 40 bytes
assert HDR.size == 40
MAGIC = b"DLPG"
FLAG_HUGETLB = 1 << 0
FLAG_THP = 1 << 1
FMT_V1 = 1 << 8
PARAM_RE = re.compile(
    r"^param: total=0x([0-9a-f]+), dirty ram=0x([0-9a-f]+), interval=(\d+) mS, "
    r"step=(\d+) id=(\d+) flags=0x([0-9a-f]+)$"
)


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def make(out: Path, cc: str, src: Path = SRC) -> Path:
    subprocess.run(
        ["make", "-C", str(src), f"CC={cc}", f"O={out}"],
        check=True, capture_output=True, text=True, timeout=120,
    )
    binary = out / "dirtyram"
    assert binary.is_file()
    return binary


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no host C compiler (gcc/cc) on PATH")
    return make(tmp_path_factory.mktemp("native"), "gcc" if cc.endswith("gcc") else "cc")


class Running:
    """A started dirtyram with line-wise access to its stdout, killed on exit."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buf = b""

    def readline(self, timeout: float) -> str:
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no complete line within {timeout}s (have {self._buf!r})")
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace")
                    raise AssertionError(f"dirtyram exited early: {self._buf!r} stderr={err!r}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def start_ok(argv: list[str]) -> tuple[Running, re.Match]:
    run = Running(argv)
    param = PARAM_RE.match(run.readline(10))
    assert param, "first line is not the 2014-compatible param line"
    return run, param


# ---------------------------------------------------------------- arguments

BAD_ARGS = [
    pytest.param([], id="no-args"),
    pytest.param(["0", "0", "0"], id="zeros"),
    pytest.param(["10", "20", "5"], id="dirty-gt-total"),
    pytest.param(["abc", "1", "1"], id="not-a-number"),
    pytest.param(["10x", "1", "1"], id="trailing-garbage"),
    pytest.param(["-5", "1", "1"], id="negative"),
    pytest.param(["99999999999", "1", "1"], id="huge-overflow"),
    pytest.param(["--bogus", "10", "1", "1"], id="unknown-option"),
    pytest.param(["10", "1"], id="two-args"),
    pytest.param(["10", "1", "1", "1"], id="four-args"),
    pytest.param(["10", "0", "5"], id="zero-dirty"),
    pytest.param(["10", "1", "0"], id="zero-interval"),
    pytest.param(["--id", "x", "10", "1", "1"], id="bad-id"),
    pytest.param(["--id"], id="id-without-value"),
    pytest.param(["--hugetlb", "--thp", "10", "1", "1"], id="hugetlb-and-thp"),
    pytest.param([" 10", "1", "1"], id="leading-space"),
    pytest.param(["+10", "1", "1"], id="plus-sign"),
]


@pytest.mark.parametrize("args", BAD_ARGS)
def test_bad_arguments_exit_2_with_usage(native, args):
    r = subprocess.run([str(native), *args], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("usage: dirtyram ")
    assert r.stdout == ""


def test_valid_run_prints_param_line_and_initial_pass(native):
    run, param = start_ok([str(native), "--id", "7", "100", "10", "50"])
    with run:
        total, dirty, interval, step, ident, flags = param.groups()
        assert (int(total, 16), int(dirty, 16), interval, step, ident) == (100, 10, "50", "10", "7")
        assert int(flags, 16) == FMT_V1
        assert run.readline(10) == "dirtyram[7]: initial pass done"
        time.sleep(0.2)
        assert run.proc.poll() is None, "dirtyram must keep running after the initial pass"


def test_default_id_is_pid(native):
    run, param = start_ok([str(native), "16", "4", "1000"])
    with run:
        assert int(param.group(5)) == run.proc.pid
        assert run.readline(10) == f"dirtyram[{run.proc.pid}]: initial pass done"


def test_thp_sets_flag(native):
    run, param = start_ok([str(native), "--thp", "--id", "3", "1024", "16", "1000"])
    with run:
        assert int(param.group(6), 16) == FMT_V1 | FLAG_THP
        assert run.readline(10) == "dirtyram[3]: initial pass done"


def test_hugetlb_flag_or_clear_error(native):
    # With no reserved hugepages the mmap must fail with a clear message, not usage.
    free = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            free = int(line.split()[1])
    if free == 0:
        r = subprocess.run([str(native), "--hugetlb", "10", "1", "1"],
                           capture_output=True, text=True, timeout=10)
        assert r.returncode == 1
        assert "MAP_HUGETLB" in r.stderr and "nr_hugepages" in r.stderr
    else:
        run, param = start_ok([str(native), "--hugetlb", "--id", "5", "10", "1", "1000"])
        with run:
            assert int(param.group(6), 16) == FMT_V1 | FLAG_HUGETLB
            assert run.readline(10) == "dirtyram[5]: initial pass done"


# ------------------------------------------------------- memory / page format

def simulate_writes(total: int, dirty: int, last_seq: int) -> dict[int, tuple[int, int]]:
    """FORMAT.md's write order replayed literally: page index -> (generation,
    write_seq) after writes 0..last_seq. O(last_seq); the reference for the model."""
    state: dict[int, tuple[int, int]] = {}
    stride = total // dirty
    seq = 0
    for i in range(total):
        if seq > last_seq:
            return state
        state[i] = (0, seq)
        seq += 1
    g = 1
    while True:
        start = (g - 1) % stride
        for i in range(dirty):
            if seq > last_seq:
                return state
            state[start + i * stride] = (g, seq)
            seq += 1
        g += 1


def expected_state(total: int, dirty: int, last_seq: int) -> dict[int, tuple[int, int]]:
    """Same as simulate_writes, in closed form (O(total)): page i = r + j*stride is
    written in passes g = r+1 (mod stride) at write_seq total + (g-1)*dirty + j."""
    stride = total // dirty
    state: dict[int, tuple[int, int]] = {}
    for i in range(min(total, last_seq + 1)):
        state[i] = (0, i)
        r, j = i % stride, i // stride
        if j >= dirty or last_seq - total - j < 0:
            continue
        gmax = (last_seq - total - j) // dirty + 1
        g = gmax - (gmax - (r + 1)) % stride
        if g >= r + 1:
            state[i] = (g, total + (g - 1) * dirty + j)
    return state


@pytest.mark.parametrize("total,dirty", [(1, 1), (7, 7), (10, 3), (70, 8), (64, 1), (9, 4)])
def test_write_order_model_matches_literal_replay(total, dirty):
    for last in range(0, total + 6 * total):
        assert expected_state(total, dirty, last) == simulate_writes(total, dirty, last), last


def find_buffer(pid: int, ident: int, total: int) -> int:
    """Address of the anonymous mapping whose first page is the instance's page 0."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if len(fields) > 5 or not fields[1].startswith("rw"):
                continue  # file-backed or [heap]/[stack]: not our mmap
            # The kernel may merge our mapping with a neighbour: scan page starts.
            for addr in range(lo, hi - total * PAGE + 1, PAGE):
                mem.seek(addr)
                h = HDR.unpack(mem.read(HDR.size))
                if h[0] == MAGIC and h[1] == ident and h[2] == 0 and h[3] == total:
                    return addr
    raise AssertionError(f"no mapping of {total * PAGE} bytes starting with page 0 of id {ident}")


def snapshot(proc: subprocess.Popen, addr: int, total: int) -> list[tuple]:
    """All headers, read while the process is stopped."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < deadline, "process did not stop"
            time.sleep(0.001)
        with open(f"/proc/{proc.pid}/mem", "rb", 0) as mem:
            mem.seek(addr)
            raw = mem.read(total * PAGE)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out = []
    for i in range(total):
        page = raw[i * PAGE:(i + 1) * PAGE]
        out.append(HDR.unpack(page[:HDR.size]) + (fnv1a32(page[:36]), page[HDR.size:]))
    return out


def check_snapshot(pages: list[tuple], ident: int, total: int, dirty: int) -> int | None:
    """Validate one snapshot against FORMAT.md; return the highest generation, or None
    if the snapshot caught a header mid-write (torn), which is itself validated."""
    torn = [i for i, p in enumerate(pages) if p[7] != p[8]]
    # A stopped writer can leave at most the one header it was writing torn.
    assert len(torn) <= 1, f"checksum mismatch on pages {torn[:10]}..."
    for i, (magic, inst, index, tot, gen, seq, flags, csum, fnv, rest) in enumerate(pages):
        assert magic == MAGIC, f"page {i}: magic {magic!r}"
        if i in torn:
            continue
        assert (inst, index, tot, flags) == (ident, i, total, FMT_V1), f"page {i}"
        assert rest == bytes(PAGE - HDR.size), f"page {i}: bytes 40.. must stay zero"
    last_seq = max(p[5] for i, p in enumerate(pages) if i not in torn)
    model = expected_state(total, dirty, last_seq)
    if torn:
        # The only legal tear is the page of the next write in FORMAT.md's order.
        nxt = expected_state(total, dirty, last_seq + 1)
        changed = [i for i in nxt if nxt[i] != model.get(i)]
        assert changed == torn, f"torn page {torn} is not the next write {changed}"
        return None
    got = {i: (p[4], p[5]) for i, p in enumerate(pages)}
    assert got == model, "generation/write_seq differ from FORMAT.md's write order"
    return max(g for g, _ in got.values())


def test_memory_headers_follow_format(native):
    ident, total, dirty = 4242, 70, 8  # stride 8; pages 64..69 only get pass 0
    run, param = start_ok([str(native), "--id", str(ident), str(total), str(dirty), "10"])
    with run:
        assert int(param.group(4)) == total // dirty
        assert run.readline(10) == f"dirtyram[{ident}]: initial pass done"
        addr = find_buffer(run.proc.pid, ident, total)

        def good_snapshot() -> int:
            for _ in range(20):
                g = check_snapshot(snapshot(run.proc, addr, total), ident, total, dirty)
                if g is not None:
                    return g
                time.sleep(0.003)
            raise AssertionError("every snapshot was torn")

        g1 = good_snapshot()
        time.sleep(0.5)
        g2 = good_snapshot()
        assert g2 > g1, f"generation must grow over time ({g1} -> {g2})"


# ------------------------------------------------------------ cross build

def needs_arm_cc():
    if shutil.which(ARM_CC) is None:
        pytest.skip(f"{ARM_CC} not installed")


@pytest.fixture(scope="module")
def arm_bin(tmp_path_factory) -> Path:
    needs_arm_cc()
    return make(tmp_path_factory.mktemp("arm"), ARM_CC)


def test_arm_build_is_reproducible_static_eabi5(arm_bin, tmp_path):
    # Second build from a copy of the sources elsewhere: -ffile-prefix-map and -s
    # must make the output independent of both the source and the output dir.
    src_copy = tmp_path / "elsewhere" / "dirtyram-src"
    shutil.copytree(SRC, src_copy, ignore=shutil.ignore_patterns("dirtyram", "*.o"))
    second = make(tmp_path / "out2", ARM_CC, src_copy)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (arm_bin, second)]
    assert digest[0] == digest[1]

    with open(arm_bin, "rb") as f:
        elf = ELFFile(f)
        assert elf.header.e_machine == "EM_ARM"
        assert elf.elfclass == 32 and elf.little_endian
        assert elf.header.e_type == "ET_EXEC"
        assert (elf.header.e_flags >> 24) == 5, "EABI version 5"
        assert elf.header.e_flags & 0x400, "hard-float ABI (EF_ARM_ABI_FLOAT_HARD)"
        kinds = {seg.header.p_type for seg in elf.iter_segments()}
        assert "PT_INTERP" not in kinds and "PT_DYNAMIC" not in kinds, "must be static"
        assert elf.get_section_by_name(".symtab") is None, "must be stripped"


def test_make_clean(tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no host C compiler")
    binary = make(tmp_path, cc)
    subprocess.run(["make", "-C", str(SRC), f"O={tmp_path}", "clean"],
                   check=True, capture_output=True, timeout=30)
    assert not binary.exists()


QEMU_ARM = shutil.which("qemu-arm-static") or shutil.which("qemu-arm")


@pytest.mark.skipif(QEMU_ARM is None,
                    reason="qemu-arm-static binary absent (apt-get install qemu-user-static)")
def test_arm_binary_runs_under_qemu_user(arm_bin):
    r = subprocess.run([QEMU_ARM, str(arm_bin), "10", "20", "5"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith("usage: dirtyram ")
    # 2000000 pages = ~8 GB: fine for a 64-bit size_t, must be refused on 32-bit ARM.
    r = subprocess.run([QEMU_ARM, str(arm_bin), "2000000", "1", "1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith("usage: dirtyram ")

    run, param = start_ok([QEMU_ARM, str(arm_bin), "--id", "9", "512", "512", "50"])
    with run:
        assert param.groups() == ("200", "200", "50", "1", "9", "100")
        assert run.readline(30) == "dirtyram[9]: initial pass done"


# ------------------------------------------------------------ guest init

def test_guest_init_is_executable_posix_sh():
    init = REPO / "builder" / "guest" / "init"
    assert init.read_text().startswith("#!/bin/sh\n")
    assert os.access(init, os.X_OK)
    sh = shutil.which("dash") or shutil.which("sh")
    subprocess.run([sh, "-n", str(init)], check=True, timeout=10)
