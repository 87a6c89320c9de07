"""What the migration tap (verifier.run.tap) costs: real migrations with and without it.

    .venv/bin/python benchmarks/tap_overhead.py [--qemu qemu-system-arm] [--mem 2048] [--repeat 3]
        [--transport unix|tcp] [--modes precopy,multifd4] [--variants direct,tap,tap-copy,tap-record,tap-callback,streamtap]

Each run starts a fresh pair of QEMUs (`-machine virt -S`, no kernel: the CPU never runs) whose
source RAM is filled with random bytes by `-device loader` (so every page is sent in full, none
as a zero page), migrates it, and times the migration from the `migrate`
command until both the source says `completed` and the destination's incoming migration is
`completed` (the destination's RAM is preallocated, -mem-prealloc, so page faults do not blur
the timing). Unlimited bandwidth is the tap's worst case; --bandwidth N caps the source at N
MiB/s, as dirtylog's throttled passes do. Variants:

- direct: the source migrates straight to the destination (the reference);
- tap: through the tap with nothing to look at (source->destination bytes move by os.splice);
- tap-copy: through the tap, splice=False (recv_into a 1 MiB buffer + sendall);
- tap-record: through the tap, recording every channel to a file;
- tap-callback: through the tap with an on_data callback that only counts bytes;
- streamtap: what `dirtylog verify` runs (verifier.run.streamtap.StreamTap): every chunk parsed and
  every page record entered in the page ledger, by a parser thread behind the forwarding ones; the
  wall time is the migration's, and `drain_s` how long the parser still needed after it
  completed (the trial waits that long, the migration does not).

Modes: precopy (one channel) and multifdN (N multifd channels). Variants are interleaved within
each repeat so that drift of the host affects them alike; the ratio is median(variant) /
median(direct) per mode. The destination's RAM is compared with the source's (pmemsave) after
the runs of the first repeat (every run with --check-all): a run whose RAM differs, or a
migration that fails, makes the script exit 1. A discarded warm-up migration comes first.

Besides wall time it reports the CPU time each party spent during the migration (source QEMU,
destination QEMU, and this process, i.e. the tap's threads): on a small or busy host the wall
time varies from run to run by more than the tap costs, and the CPU time says what the tap
takes from the machine regardless. The table gives median and fastest run per variant, each as
a ratio to direct; run with a larger --repeat on a host that is otherwise idle.

Prints a table and, last, one JSON line with every timing. Needs a few GiB of free memory and
disk for --mem 2048 (two guests, their pmemsave images, the random file).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from verifier.run.qemu import QemuProcess, probe_qemu  # noqa: E402
from verifier.run.remote_qemu import short_socket_dir  # noqa: E402
from verifier.run.tap import Tap  # noqa: E402

RAM_BASE = 0x40000000
LOAD_OFFSET = 2 << 20  # the dtb sits at the start of RAM when there is no kernel
UNLIMITED = 100 * 1024 ** 3
VARIANTS = ("direct", "tap", "tap-copy", "tap-record", "tap-callback", "streamtap")


def guest_args(mem_mb: int, load: Path | None, incoming: bool) -> list[str]:
    args = ["-machine", "virt", "-accel", "tcg", "-m", f"{mem_mb}M", "-smp", "1",
            "-display", "none", "-nodefaults", "-S"]
    if load is not None:
        args += ["-device", f"loader,file={load},addr={RAM_BASE + LOAD_OFFSET:#x}"]
    if incoming:  # the destination's RAM faulted in beforehand: the run times the channel, not page faults
        args += ["-mem-prealloc", "-incoming", "defer"]
    return args


def wait(proc: QemuProcess, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = proc.qmp("query-migrate").get("status")
        if status in ("completed", "failed", "cancelled"):
            return status
        if time.monotonic() > deadline:
            return f"timeout ({status})"
        time.sleep(0.01)


def ram_digest(proc: QemuProcess, mem_mb: int, path: Path) -> str:
    proc.qmp("pmemsave", val=RAM_BASE, size=mem_mb << 20, filename=str(path), timeout=300)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    path.unlink()
    return h.hexdigest()


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(qemu, work: Path, sock_dir: Path, data: Path, mem_mb: int, mode: str, variant: str,
            transport: str, run_id: str, check: bool, bandwidth: int = UNLIMITED) -> dict:
    channels = int(mode[len("multifd"):]) if mode.startswith("multifd") else 0
    rundir = work / run_id
    rundir.mkdir()
    if transport == "unix":
        dst_uri, tap_uri = f"unix:{sock_dir}/{run_id}-d.sock", f"unix:{sock_dir}/{run_id}-t.sock"
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dst_uri = f"tcp:127.0.0.1:{s.getsockname()[1]}"
        tap_uri = "tcp:127.0.0.1:0"
    counted = [0]
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(QemuProcess(qemu, guest_args(mem_mb, data, False), rundir, "src"))
        dst = stack.enter_context(QemuProcess(qemu, guest_args(mem_mb, None, True), rundir, "dst"))
        if channels:
            caps = [{"capability": "multifd", "state": True}]
            for side in (src, dst):
                side.qmp("migrate-set-capabilities", capabilities=caps)
                side.qmp("migrate-set-parameters", **{"multifd-channels": channels})
        src.qmp("migrate-set-parameters", **{"max-bandwidth": bandwidth})
        dst.qmp("migrate-incoming", uri=dst_uri)
        uri = dst_uri
        tap = None
        if variant == "streamtap":
            from verifier.run.streamtap import StreamTap
            tap = stack.enter_context(StreamTap(tap_uri, dst_uri, rundir, ram_block_bytes=mem_mb << 20,
                                                page_size=4096))
            uri = tap.listen_uri
        elif variant != "direct":
            kwargs = {"tap": {}, "tap-copy": {"splice": False}, "tap-record": {"record": True},
                      "tap-callback": {"on_data": lambda ch, chunk: counted.__setitem__(0, counted[0] + len(chunk))}
                      }[variant]
            tap = stack.enter_context(Tap(tap_uri, dst_uri, rundir, **kwargs))
            uri = tap.listen_uri
        cpu0 = (cpu_seconds(src.proc.pid), cpu_seconds(dst.proc.pid), time.process_time())
        t0 = time.monotonic()
        src.qmp("migrate", uri=uri)
        s_status = wait(src, 600)
        d_status = wait(dst, 600)
        wall = time.monotonic() - t0
        cpu1 = (cpu_seconds(src.proc.pid), cpu_seconds(dst.proc.pid), time.process_time())
        info = src.qmp("query-migrate")
        result = {"mode": mode, "variant": variant, "wall_s": round(wall, 3), "status": s_status,
                  "dst_status": d_status, "qemu_total_ms": info.get("total-time"),
                  "transferred": (info.get("ram") or {}).get("transferred"),
                  # this process: the tap's threads (+ the QMP polling every run has)
                  "cpu_s": {k: round(b - a, 3) for k, a, b in zip(("src", "dst", "tap"), cpu0, cpu1)}}
        if variant == "streamtap":
            t1 = time.monotonic()
            parsed = tap.close()
            result["drain_s"] = round(time.monotonic() - t1, 3)
            result["tap_channels"] = len(parsed["channels"])
            result["tap_bytes"] = sum(c["bytes"] for c in parsed["channels"])
            result["tap_error"] = "; ".join(parsed["errors"]) or None
            result["ledger_pages_sent"] = parsed["ledger"].get("pages_sent")
        elif tap is not None:
            summary = tap.close()
            result["tap_channels"] = len(summary.channels)
            result["tap_bytes"] = sum(c.bytes_to_destination for c in summary.channels)
            result["tap_error"] = str(summary.error) if summary.error else None
        if check and s_status == d_status == "completed":
            result["ram_equal"] = (ram_digest(src, mem_mb, rundir / "src.ram")
                                   == ram_digest(dst, mem_mb, rundir / "dst.ram"))
    shutil.rmtree(rundir, ignore_errors=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qemu", default="qemu-system-arm")
    ap.add_argument("--mem", type=int, default=2048, help="guest RAM in MiB (default 2048)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    ap.add_argument("--modes", default="precopy,multifd4")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--bandwidth", type=int, default=0,
                    help="max-bandwidth of the source in MiB/s (default: unlimited, the tap's worst case)")
    ap.add_argument("--no-check", action="store_true", help="skip the RAM comparison")
    ap.add_argument("--check-all", action="store_true",
                    help="compare RAM after every run, not only in the first repeat (the two pmemsave "
                         "images per run disturb the timing of the next runs)")
    args = ap.parse_args()
    qemu = probe_qemu(args.qemu)
    modes = args.modes.split(",")
    bandwidth = args.bandwidth << 20 if args.bandwidth else UNLIMITED
    variants = args.variants.split(",")
    if "direct" not in variants:
        variants.insert(0, "direct")
    work = Path(tempfile.mkdtemp(prefix="tap-overhead-"))
    sock_dir = short_socket_dir()  # unix socket paths are limited to 107 bytes
    results: list[dict] = []
    bad = 0
    try:
        data = work / "random.bin"
        with open(data, "wb") as f:
            left = (args.mem << 20) - LOAD_OFFSET
            while left:
                n = min(left, 64 << 20)
                f.write(os.urandom(n))
                left -= n
        print(f"QEMU {qemu.version_str} ({qemu.path}), {args.mem} MiB of random RAM, {args.transport}, "
              f"{os.cpu_count()} CPUs, {args.repeat} repeat(s), max-bandwidth "
              f"{str(args.bandwidth) + ' MiB/s' if args.bandwidth else 'unlimited'}", flush=True)
        # a discarded warm-up run first (page cache, first QEMU start)
        one_run(qemu, work, sock_dir, data, args.mem, modes[0], "direct", args.transport, "warmup", False, bandwidth)
        for rep in range(args.repeat):
            for mode in modes:
                for variant in variants:
                    check = not args.no_check and (rep == 0 or args.check_all)
                    r = one_run(qemu, work, sock_dir, data, args.mem, mode, variant, args.transport,
                                f"{rep}-{mode}-{variant}", check, bandwidth)
                    r["repeat"] = rep
                    results.append(r)
                    ok = (r["status"] == r["dst_status"] == "completed" and r.get("ram_equal", True)
                          and not r.get("tap_error"))
                    bad += not ok
                    cpu = r["cpu_s"]
                    print(f"  #{rep} {mode:9} {variant:13} {r['wall_s']:7.3f} s  QEMU total-time "
                          f"{r['qemu_total_ms']} ms  CPU s: src {cpu['src']:.2f} dst {cpu['dst']:.2f} "
                          f"tap {cpu['tap']:.2f}  " + (f"drain {r['drain_s']:.2f} s  " if "drain_s" in r else "") +
                          f"{('RAM equal' if r.get('ram_equal') else 'ok') if ok else 'FAILED: ' + json.dumps(r)}",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
    print()
    print(f"{'mode':10} {'variant':14} {'median s':>9} {'ratio':>7} {'min s':>7} {'ratio':>7} "
          f"{'tap CPU s':>9}")
    ratios = {}
    for mode in modes:
        base = [r for r in results if r["mode"] == mode and r["variant"] == "direct"]
        base_wall = statistics.median(r["wall_s"] for r in base)
        base_min = min(r["wall_s"] for r in base)
        for variant in variants:
            rs = [r for r in results if r["mode"] == mode and r["variant"] == variant]
            wall = statistics.median(r["wall_s"] for r in rs)
            fastest = min(r["wall_s"] for r in rs)
            tap_cpu = statistics.median(r["cpu_s"]["tap"] for r in rs)
            ratio = wall / base_wall if base_wall else float("nan")
            ratios[f"{mode}/{variant}"] = {"median": round(ratio, 3), "min": round(fastest / base_min, 3)}
            print(f"{mode:10} {variant:14} {wall:9.3f} {ratio:7.3f} {fastest:7.3f} "
                  f"{fastest / base_min:7.3f} {tap_cpu:9.2f}")
    print(json.dumps({"qemu": qemu.version_str, "mem_mb": args.mem, "transport": args.transport,
                      "bandwidth_mib_s": args.bandwidth or None,
                      "cpus": os.cpu_count(), "ratios": ratios, "runs": results}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
