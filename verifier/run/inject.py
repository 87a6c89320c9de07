"""Negative controls: faults injected on purpose, to prove that a verification can fail.

- untracked-writes: while the source is paused just before switchover (the
  `pause-before-switchover` capability), a separate host process writes a marker into a few
  guest pages through the source's shared RAM backing file: memory changed behind QEMU's back,
  so its dirty log cannot know. The destination must be found to differ in exactly those pages.
- corrupt-capture: bytes flipped in the destination's captured image; the comparison must name
  exactly those pages.
- stream-drop / stream-flip (verifier.run.streamtap.StreamInjector): the stream tap withholds N
  page records of the final RAM section (sent after the source stopped, so never sent again), or
  flips a byte in the body of N dirtyram pages there; the provenance must say "not re-sent" or
  "never sent" for the first and "sent with content the source never had" for the second.
- stream-device: the stream tap flips the low byte of one device field in the stream (the timer
  section's cpu_ticks_offset, which an ARM guest does not read); the device-state comparison must
  name exactly that field between source and destination and between stream and source, and find
  the destination identical to what it received.

Run as `python -m verifier.run.inject IMAGE NONCE PAGE...` it is the separate writer process.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from verifier.errors import CaptureError, InputError

PAGE_SIZE = 4096
MARKER_OFFSET = 2048  # middle of the page: never where dirtyram's header lives
KINDS = ("untracked-writes", "corrupt-capture", "cpu-register", "stream-drop", "stream-flip", "stream-device")
# cpu-register plants a value in callee-saved general registers of the destination's vCPU 0
# (through its gdbstub) before the destination's CPU state is read, then restores them so the
# guest resumes unharmed: the CPU-state comparison must name exactly those registers.
PLANT_REGISTERS = {"armv7": ["r4", "r5", "r6", "r7", "r8", "r9", "r10", "r11"],
                   "aarch64": ["x19", "x20", "x21", "x22", "x23", "x24", "x25", "x26"],
                   "x86_64": ["rbx", "rbp", "r12", "r13", "r14", "r15"]}
SKIP_LOW_BYTES = 16 << 20  # leave the kernel image alone: the guest must keep running


def parse_inject(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    kind, _, count = text.partition(":")
    if kind not in KINDS:
        raise InputError(f"--inject {text}: expected {', '.join(KINDS)}, optionally with :N (pages; registers)")
    try:
        n = int(count) if count else 8
    except ValueError:
        raise InputError(f"--inject {text}: N must be a whole number of pages") from None
    if not 1 <= n <= 4096:
        raise InputError(f"--inject {text}: N must be between 1 and 4096")
    if kind == "stream-device":
        if count and count != "1":
            raise InputError(f"--inject {text}: stream-device changes one device field (timer/cpu_ticks_offset); "
                             f"N can only be 1")
        return kind, 1
    if kind == "cpu-register":
        n = int(count) if count else 1
        most = min(len(r) for r in PLANT_REGISTERS.values())
        if not 1 <= n <= most:
            raise InputError(f"--inject {text}: N must be between 1 and {most} registers")
    return kind, n


def plant_registers(stub, arch: str, n: int) -> list[dict]:
    """Flip the low byte of n callee-saved registers of vCPU 0 through `stub` (a connected
    verifier.capture.cpustate.GdbStub of a stopped VM). Returns [{vcpu, register, regnum, original}]
    for restore_registers()."""
    tid = stub.thread_ids()[0]
    stub.select(tid)
    planted = []
    for name in PLANT_REGISTERS[arch][:n]:
        num = stub.regnum(name)
        original = stub.read_register(num)
        value = bytes([bytes.fromhex(original)[0] ^ 0x5A]) + bytes.fromhex(original)[1:]
        stub.write_register(num, value.hex())
        planted.append({"vcpu": 0, "register": name, "regnum": num, "original": original, "tid": tid})
    return planted


def restore_registers(stub, planted: list[dict]) -> None:
    for p in planted:
        stub.select(p["tid"])
        stub.write_register(p["regnum"], p["original"])


def check_registers(planted: list[dict], differences: list[dict]) -> dict:
    """Did the CPU-state comparison name exactly the planted registers?"""
    inj = {(p["vcpu"], p["register"]) for p in planted}
    diff = {(d["vcpu"], d["register"]) for d in differences}
    return {"injected": len(inj), "detected": len(inj & diff),
            "missed": sorted(f"vCPU {v} {r}" for v, r in inj - diff), "other_differences": len(diff - inj),
            "unit": "registers"}


def marker(nonce: str, page: int) -> bytes:
    return f"DIRTYLOG-INJECTED nonce={nonce} page={page}\n".encode()


def choose_zero_pages(image: Path, n: int, rng: random.Random) -> list[int]:
    """n distinct pages that are all zero now (unused by the guest, most likely untouched soon)."""
    size = image.stat().st_size
    first, last = SKIP_LOW_BYTES // PAGE_SIZE, size // PAGE_SIZE
    zero = bytes(PAGE_SIZE)
    chosen: set[int] = set()
    with open(image, "rb") as f:
        for _ in range(200 * n):
            p = rng.randrange(first, last)
            if p not in chosen and os.pread(f.fileno(), PAGE_SIZE, p * PAGE_SIZE) == zero:
                chosen.add(p)
                if len(chosen) == n:
                    return sorted(chosen)
    raise CaptureError(f"could not find {n} unused pages in {image} to inject into")


def write_untracked(image: Path, pages: list[int], nonce: str) -> None:
    """Write the markers from a separate process, as any other host program could."""
    proc = subprocess.run([sys.executable, "-m", "verifier.run.inject", str(image), nonce, *map(str, pages)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise CaptureError(f"the injecting process failed: {proc.stderr.strip()[-300:]}")


def corrupt_capture(image: Path, n: int, rng: random.Random) -> list[int]:
    size = image.stat().st_size
    pages = sorted(rng.sample(range(size // PAGE_SIZE), n))
    with open(image, "r+b") as f:
        for p in pages:
            off = p * PAGE_SIZE + rng.randrange(PAGE_SIZE)
            byte = os.pread(f.fileno(), 1, off)
            os.pwrite(f.fileno(), bytes([byte[0] ^ 0xFF]), off)
    return pages


def check(injected: list[int], diff_pages) -> dict:
    """Did the comparison name exactly the injected pages?"""
    diff = set(diff_pages)
    inj = set(injected)
    return {"injected": len(inj), "detected": len(inj & diff), "missed": sorted(inj - diff),
            "other_differences": len(diff - inj)}


def check_fields(injected: list[str], device_state: dict) -> dict:
    """stream-device: is each changed field named between source and destination and between stream
    and source, and the destination identical to what it received (stream/destination)?"""
    pairs = device_state.get("pairs", {})

    def named(pair: str) -> set[str]:
        return {d["field"] for d in pairs.get(pair, {}).get("differences", [])}
    src_dst, stream_src, stream_dst = named("source/destination"), named("stream/source"), named("stream/destination")
    found = [f for f in injected if f in src_dst and f in stream_src and f not in stream_dst]
    return {"injected": len(injected), "detected": len(found), "missed": [f for f in injected if f not in found],
            "other_differences": len((src_dst | stream_src | stream_dst) - set(injected)), "unit": "fields"}


def _main(argv: list[str]) -> int:
    image, nonce, pages = Path(argv[0]), argv[1], [int(p) for p in argv[2:]]
    fd = os.open(image, os.O_RDWR)
    try:
        for p in pages:
            os.pwrite(fd, marker(nonce, p), p * PAGE_SIZE + MARKER_OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
