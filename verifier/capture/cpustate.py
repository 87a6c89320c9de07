"""A CPU-state oracle read through QEMU's gdbstub, independent of migration's serialization.

QEMU is started with `verifier.run.qemu.gdb_args("gdb-src.sock")` (a unix socket in its working directory). After a
migration, with both VMs stopped (source `postmigrate`, destination `paused`), `GdbStub` reads
every register the stub describes in its target description, for every vCPU, and `compare()`
says which registers differ between source and destination, minus an allowlist of registers
known to differ on a clean migration (`cpustate_allowlist.json`: {arch: {register or fnmatch
pattern: reason}}). The lists are empty because nothing needs them yet: with both VMs stopped, no
register differed on clean migrations of vexpress-a15 (448 registers, 2 vCPUs), virt (390),
virt-aarch64 (228) and q35 (66) under TCG by dirtylog verify (armv7 on QEMU 7.2 and 10.0, the
others on Debian's 7.2). A register that legitimately differs (a counter QEMU recomputes, say)
goes there with its reason, never silently dropped; what it allows is still listed in the
report's "allowed". One rule is not a name: the ISTATUS bit of the ARM generic timers' CTL registers
(the timer condition, recomputed on load), when it is the only bit that differs (`_derived_bits`).

The client speaks the GDB Remote Serial Protocol itself (framing, acks, escapes, run-length
decoding) so that reading ~300 registers x N vCPUs costs milliseconds and needs no gdb.

Run state: QEMU stops a *running* VM when a gdb client connects, and resumes it on 'D'
(detach) or 'c'. A client that only reads never sends those and just closes the socket; on an
already stopped VM (postmigrate, paused) connect and close leave the run state unchanged
(measured on QEMU 7.2 and 10.0 with QMP query-status).

    with GdbStub(trial_dir / "gdb-src.sock") as stub:
        src = stub.read_all()        # {vcpu: {register: hex-bytes-as-sent | "unavailable"}}
    result = compare(src, dst, "armv7")
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import socket
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from verifier.errors import VerifyError

UNAVAILABLE = "unavailable"
DEFAULT_TIMEOUT_S = 10.0
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux
ALLOWLIST_PATH = Path(__file__).with_name("cpustate_allowlist.json")
ARCHES = ("armv7", "aarch64", "x86_64")
_STOP_REPLY = re.compile(rb"^[ST][0-9a-fA-F]{2}")


class CpuStateError(VerifyError):
    """The gdbstub could not be reached, did not answer, or answered nonsense."""

    exit_code = 3


# ----------------------------------------------------------------------------- packet layer

def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """Escape '#', '$', '}' and '*' in a packet body ('}' then the byte xor 0x20)."""
    out = bytearray()
    for b in data:
        if b in b"#$}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def frame(data: bytes) -> bytes:
    """`$<escaped data>#<checksum>`; the checksum covers the data as sent."""
    body = escape(data)
    return b"$" + body + b"#" + b"%02x" % checksum(body)


def decode_body(body: bytes) -> bytes:
    """Undo escaping and run-length encoding of a received packet body (as on the wire)."""
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        b = body[i]
        if b == 0x7D:  # '}' escape
            if i + 1 >= n:
                raise CpuStateError("gdbstub sent a malformed reply: escape at end of packet")
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A:  # '*' run length: repeat the previous byte (count - 29) more times
            if not out or i + 1 >= n:
                raise CpuStateError("gdbstub sent a malformed reply: run-length without a byte")
            count = body[i + 1] - 29
            if count < 0:
                raise CpuStateError(f"gdbstub sent a malformed reply: run-length count {body[i + 1]:#x}")
            out += bytes((out[-1],)) * count
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def parse_packet(buf: bytes) -> tuple[bytes | None, int]:
    """Find one complete `$...#cs` packet in `buf`: (body as on the wire, bytes consumed).

    Leading acks ('+'/'-'), stray bytes and '%' notifications are skipped. (None, consumed)
    when no complete packet is there yet. Raises on a checksum mismatch.
    """
    start = buf.find(b"$")
    if start < 0:
        return None, len(buf)
    end = buf.find(b"#", start + 1)
    if end < 0 or end + 3 > len(buf):
        return None, start
    body = buf[start + 1:end]
    try:
        want = int(buf[end + 1:end + 3], 16)
    except ValueError:
        raise CpuStateError(f"gdbstub sent a malformed reply: checksum {buf[end + 1:end + 3]!r}") from None
    if checksum(body) != want:
        raise CpuStateError(f"gdbstub sent a malformed reply: checksum {want:02x}, "
                            f"computed {checksum(body):02x}")
    return body, end + 3


# ----------------------------------------------------------------------------- target description

def parse_regs(xml_text: str, next_regnum: int = 0) -> tuple[list[tuple[int, str, int]], list[str], int]:
    """The <reg> elements of one feature document, in order, and its xi:include'd hrefs.

    Returns ([(regnum, name, bitsize)], [href], next regnum). A reg without regnum is the
    previous one + 1 (the first one continues from `next_regnum`).
    """
    # QEMU writes <xi:include> without declaring the xi namespace; drop prefixes before parsing.
    xml_text = re.sub(r"<(/?)[A-Za-z_][\w.-]*:", r"<\1", xml_text)
    xml_text = re.sub(r"\sxmlns(?::\w+)?=(\"[^\"]*\"|'[^']*')", "", xml_text)
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise CpuStateError(f"gdbstub sent a malformed target description: {exc}") from None
    regs: list[tuple[int, str, int]] = []
    includes: list[str] = []
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "include":
            href = el.get("href")
            if href:
                includes.append(href)
        elif tag == "reg":
            name = el.get("name")
            if name is None:
                raise CpuStateError("gdbstub sent a malformed target description: <reg> without name")
            try:
                regnum = int(el.get("regnum", str(next_regnum)), 10)
                bitsize = int(el.get("bitsize", "0"), 10)
            except ValueError:
                raise CpuStateError(f"gdbstub sent a malformed target description: register {name}") from None
            regs.append((regnum, name, bitsize))
            next_regnum = regnum + 1
    return regs, includes, next_regnum


# ----------------------------------------------------------------------------- client

class GdbStub:
    """A minimal GDB Remote Serial Protocol client for QEMU's gdbstub over a unix socket.

    It never sends 'D', 'c', 's', 'k' or 'vCont': leaving the block just closes the socket, so
    the VM's run state is whatever it was before (a stopped VM stays stopped).
    """

    def __init__(self, sock_path: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT_S):
        self.sock_path = str(sock_path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._regs: list[tuple[int, str, int]] | None = None
        self.features: dict[str, str] = {}
        self.packets = 0  # packets exchanged, for benchmarks

    # -- connection
    def __enter__(self) -> "GdbStub":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        path = os.path.abspath(self.sock_path)
        dirfd = None
        try:
            if len(path.encode()) > _SUN_PATH_MAX:
                # sun_path is 108 bytes; reach a socket in a deep directory through the fd.
                dirfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
                path = f"/proc/self/fd/{dirfd}/{os.path.basename(path)}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(path)
        except OSError as exc:
            raise CpuStateError(f"cannot connect to gdbstub socket {self.sock_path}: "
                                f"{exc.strerror or exc}") from None
        finally:
            if dirfd is not None:
                os.close(dirfd)
        self._sock = sock
        self._handshake()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    # -- raw I/O
    def _recv_some(self, deadline: float, what: str) -> None:
        assert self._sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise CpuStateError(f"gdbstub {self.sock_path} did not answer {what} within {self.timeout:g} s")
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(65536)
        except socket.timeout:
            raise CpuStateError(f"gdbstub {self.sock_path} did not answer {what} within {self.timeout:g} s") from None
        except OSError as exc:
            raise CpuStateError(f"gdbstub {self.sock_path} connection failed during {what}: "
                                f"{exc.strerror or exc}") from None
        if not data:
            raise CpuStateError(f"gdbstub {self.sock_path} closed the connection during {what}")
        self._buf += data

    def _sendall(self, data: bytes, what: str) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise CpuStateError(f"gdbstub {self.sock_path} connection failed sending {what}: "
                                f"{exc.strerror or exc}") from None

    def command(self, cmd: str | bytes) -> bytes:
        """Send one packet, wait for its ack and for the reply; the decoded reply body."""
        if self._sock is None:
            raise CpuStateError(f"gdbstub {self.sock_path} is not connected")
        data = cmd.encode() if isinstance(cmd, str) else cmd
        what = repr(data[:40].decode("ascii", "replace"))
        deadline = time.monotonic() + self.timeout
        self._sendall(frame(data), what)
        self.packets += 1
        retries = 0
        acked = False
        while True:
            # The ack comes first; QEMU may also send it in the same read as the reply.
            if not acked:
                while self._buf[:1] not in (b"+", b"-", b"$"):
                    if self._buf:
                        self._buf = self._buf[1:]
                    else:
                        self._recv_some(deadline, what)
                if self._buf[:1] == b"-":
                    self._buf = self._buf[1:]
                    retries += 1
                    if retries > 3:
                        raise CpuStateError(f"gdbstub {self.sock_path} kept rejecting {what}")
                    self._sendall(frame(data), what)
                    continue
                if self._buf[:1] == b"+":
                    self._buf = self._buf[1:]
                acked = True
            body, used = parse_packet(self._buf)
            if body is None:
                self._buf = self._buf[used:]
                self._recv_some(deadline, what)
                continue
            self._buf = self._buf[used:]
            self._sendall(b"+", what)
            reply = decode_body(body)
            if _STOP_REPLY.match(reply):
                # An asynchronous stop reply: QEMU 7.2 sends one when connecting stopped a
                # running VM. None of our commands is answered by one; wait for the real reply.
                deadline = time.monotonic() + self.timeout
                continue
            return reply

    # -- protocol
    def _handshake(self) -> None:
        reply = self.command("qSupported:xmlRegisters=arm,i386,aarch64").decode("ascii", "replace")
        if not reply:
            raise CpuStateError(f"gdbstub {self.sock_path} sent a malformed reply to qSupported: empty")
        for item in reply.split(";"):
            if "=" in item:
                k, v = item.split("=", 1)
                self.features[k] = v
            elif item.endswith(("+", "-", "?")):
                self.features[item[:-1]] = item[-1]
        if self.features.get("qXfer:features:read") != "+":
            raise CpuStateError(f"gdbstub {self.sock_path} offers no target description (qSupported: {reply[:80]})")

    def read_feature(self, annex: str) -> str:
        """One document of the target description through qXfer:features:read, all chunks."""
        out = bytearray()
        chunk = 0xFFB
        while True:
            reply = self.command(f"qXfer:features:read:{annex}:{len(out):x},{chunk:x}")
            if reply[:1] not in (b"m", b"l"):
                raise CpuStateError(f"gdbstub {self.sock_path} sent a malformed reply to "
                                    f"qXfer:features:read:{annex}: {reply[:40]!r}")
            out += reply[1:]
            if reply[:1] == b"l" or len(reply) == 1:
                return out.decode("utf-8", "replace")

    def registers(self) -> list[tuple[int, str, int]]:
        """[(regnum, name, bitsize)] of target.xml and every document it includes, in order."""
        if self._regs is None:
            regs: list[tuple[int, str, int]] = []
            seen: set[str] = set()
            nxt = 0

            def walk(annex: str) -> None:
                nonlocal nxt
                if annex in seen:
                    return
                seen.add(annex)
                found, includes, nxt = parse_regs(self.read_feature(annex), nxt)
                regs.extend(found)
                for href in includes:
                    walk(href)

            walk("target.xml")
            self._regs = regs
        return self._regs

    def thread_ids(self) -> list[str]:
        """vCPU thread ids (hex strings) in the stub's order: qfThreadInfo then qsThreadInfo."""
        tids: list[str] = []
        reply = self.command("qfThreadInfo")
        for _ in range(4096):
            if reply[:1] == b"l":
                break
            if reply[:1] != b"m":
                raise CpuStateError(f"gdbstub {self.sock_path} sent a malformed reply to "
                                    f"qfThreadInfo: {reply[:40]!r}")
            tids += [t for t in reply[1:].decode("ascii", "replace").split(",") if t]
            reply = self.command("qsThreadInfo")
        if not tids:
            raise CpuStateError(f"gdbstub {self.sock_path} lists no vCPU threads")
        return tids

    def select(self, tid: str) -> None:
        reply = self.command(f"Hg{tid}")
        if reply != b"OK":
            raise CpuStateError(f"gdbstub {self.sock_path} refused to select thread {tid}: {reply[:40]!r}")

    def read_register(self, regnum: int) -> str | None:
        """Hex of the raw bytes as sent (target byte order); None when unreadable."""
        reply = self.command(f"p{regnum:x}")
        if not reply or (reply[:1] == b"E" and len(reply) == 3):
            return None
        text = reply.decode("ascii", "replace").lower()
        if not re.fullmatch(r"(?:[0-9a-f]{2}|xx)+", text):
            raise CpuStateError(f"gdbstub {self.sock_path} sent a malformed reply to p{regnum:x}: {reply[:40]!r}")
        return text

    def write_register(self, regnum: int, hexbytes: str) -> None:
        """Write one register (hex of the raw bytes, target byte order); for tests."""
        reply = self.command(f"P{regnum:x}={hexbytes}")
        if reply != b"OK":
            raise CpuStateError(f"gdbstub {self.sock_path} refused to write register {regnum}: {reply[:40]!r}")

    def regnum(self, name: str) -> int:
        for num, n, _ in self.registers():
            if n == name:
                return num
        raise CpuStateError(f"gdbstub {self.sock_path} has no register named {name}")

    def read_all(self) -> dict[int, dict[str, str]]:
        """{vCPU index: {register name: hex of raw bytes | "unavailable"}} for every vCPU."""
        regs = self.registers()
        names: dict[int, str] = {}
        count: dict[str, int] = {}
        for _, name, _ in regs:
            count[name] = count.get(name, 0) + 1
        for num, name, _ in regs:
            names[num] = f"{name}#{num}" if count[name] > 1 else name
        out: dict[int, dict[str, str]] = {}
        for index, tid in enumerate(self.thread_ids()):
            self.select(tid)
            values: dict[str, str] = {}
            for num, _, _ in regs:
                value = self.read_register(num)
                values[names[num]] = UNAVAILABLE if value is None else value
            out[index] = values
        return out


# ----------------------------------------------------------------------------- comparison

def load_allowlist(arch: str, path: Path = ALLOWLIST_PATH) -> dict[str, str]:
    """{register name or fnmatch pattern: reason} for one architecture."""
    with open(path) as f:
        data = json.load(f)
    if arch not in data:
        raise CpuStateError(f"no CPU-state allowlist for architecture {arch!r} in {path}")
    return data[arch]


def _allowed(name: str, allow: dict[str, str]) -> str | None:
    if name in allow:
        return allow[name]
    for pattern, reason in allow.items():
        if fnmatch.fnmatchcase(name, pattern):
            return reason
    return None


# ARM generic timer control registers: ISTATUS (bit 2) is the timer condition, recomputed from the
# counter and CVAL when the state is loaded (target/arm/helper.c gt_recalc_timer), so a source read
# before the deadline and a destination loaded after it differ in that bit alone.
_GT_CTL = ("CNTP_CTL*", "CNTV_CTL*", "CNTHP_CTL*", "CNTHV_CTL*")
_ISTATUS = 0x4


def _derived_bits(arch: str, name: str, sv: str, dv: str) -> str | None:
    """The reason a difference is in bits QEMU recomputes on load (not migrated state), or None."""
    if arch not in ("armv7", "aarch64") or not any(fnmatch.fnmatchcase(name, p) for p in _GT_CTL):
        return None
    try:
        a, b = int.from_bytes(bytes.fromhex(sv), "little"), int.from_bytes(bytes.fromhex(dv), "little")
    except ValueError:
        return None
    if a ^ b == _ISTATUS:
        return "ISTATUS, the timer condition: recomputed from the counter and CVAL on load (gt_recalc_timer)"
    return None


def compare(src: dict, dst: dict, arch: str, allowlist: dict[str, str] | None = None) -> dict:
    """Register-by-register comparison of two `read_all()` results.

    A register present on one side only (or a vCPU missing on one side) is a difference;
    its missing value is reported as None. Differences on allowlisted registers go to "allowed".
    """
    allow = load_allowlist(arch) if allowlist is None else allowlist
    differences: list[dict] = []
    allowed: list[dict] = []
    compared = 0
    for vcpu in sorted(set(src) | set(dst), key=int):
        s = src.get(vcpu, {})
        d = dst.get(vcpu, {})
        for name in list(s) + [n for n in d if n not in s]:
            compared += 1
            sv, dv = s.get(name), d.get(name)
            if sv == dv:
                continue
            entry = {"vcpu": int(vcpu), "register": name, "src": sv, "dst": dv}
            reason = (_allowed(name, allow) or _derived_bits(arch, name, sv, dv)) if sv is not None and dv is not None \
                else None
            if reason is not None:
                allowed.append({**entry, "reason": reason})
            else:
                differences.append(entry)
    return {"identical": not differences, "differences": differences, "allowed": allowed,
            "registers_compared": compared}


def show_value(hexbytes: str | None) -> str:
    """A raw little-endian value as the stub sent it, shown as one hex number ("0x..")."""
    if hexbytes is None:
        return "absent"
    if hexbytes == UNAVAILABLE or not hexbytes:
        return hexbytes or "empty"
    if "x" in hexbytes:  # unavailable bytes
        return hexbytes
    be = bytes.fromhex(hexbytes)[::-1]
    return "0x" + be.hex()


def format_differences(result: dict, limit: int = 20) -> list[str]:
    """One line per difference, readable: 'vCPU 0 TTBR1_S: src 0x8000406a dst 0x0'."""
    lines = []
    for d in result["differences"][:limit]:
        lines.append(f"vCPU {d['vcpu']} {d['register']}: src {show_value(d['src'])} "
                     f"dst {show_value(d['dst'])}")
    if len(result["differences"]) > limit:
        lines.append(f"... and {len(result['differences']) - limit} more")
    return lines
