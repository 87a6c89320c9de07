"""Timings of the patched QEMU (issue #4).

    python benchmarks/qemu_build.py [--version 10.0] [--sizes 256M,2G] [--cold] [--artifacts DIR]

Prints:
- the cold build time (the one recorded when the cached build was made; `--cold` rebuilds
  from nothing into a temporary cache, downloads included, which takes as long as a build),
- the cached build time (a cache hit, measured now),
- for each guest size (`-M virt -smp 1`, guest booted with the seed workloads, anonymous RAM),
  the time QEMU takes to write the -savedirtylog image (write + fsync), on the source and on
  the destination of one migration, against QMP `pmemsave` of the same RAM afterwards (as
  is, and followed by an fsync of the file like -savedirtylog does).

The -savedirtylog time is measured from the appearance of `<image>.partial` to the rename to
`<image>` (polled every millisecond), so it is accurate to about 1 ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder import qemu_build  # noqa: E402
from builder.build import build_artifacts  # noqa: E402
from builder.cache import Cache  # noqa: E402
from verifier.artifacts import load_artifacts  # noqa: E402
from verifier.run.migration import MigrationPolicy, run_migration, start_incoming  # noqa: E402
from builder.machines import MACHINES  # noqa: E402
from verifier.run.qemu import GuestConfig, QemuProcess, machine_args, probe_qemu  # noqa: E402
from verifier.run.trial import READY_RE  # noqa: E402
from verifier.capture.savedirtylog import savedirtylog_args, wait_for_image  # noqa: E402
from verifier.run.workload import SEED_WORKLOADS, kernel_cmdline_arg  # noqa: E402


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"M": 1, "G": 1024}.get(text[-1])
    return int(text[:-1]) * mult if mult else int(text)


class WriteTimer(threading.Thread):
    """Time from `<path>.partial` appearing to `<path>` appearing."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.started: float | None = None
        self.done: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            now = time.perf_counter()
            if self.started is None and self.partial.exists():
                self.started = now
            if self.path.exists():
                self.done = now
                if self.started is None:  # missed the partial file entirely
                    self.started = now
                return
            time.sleep(0.001)

    def stop(self) -> None:
        self._halt.set()

    @property
    def seconds(self) -> float | None:
        return None if self.started is None or self.done is None else self.done - self.started


def image_timings(qemu_path: Path, art, mem_mb: int, workdir: Path) -> dict:
    qemu = probe_qemu(str(qemu_path))
    machine = MACHINES["virt"]
    append = " ".join((f"console={machine.console}", "panic=1", kernel_cmdline_arg(SEED_WORKLOADS)))
    cfg = GuestConfig(machine=machine, kernel=art.kernel.resolve(), dtb=None, initrd=art.initrd.resolve(),
                      append=append, mem_mb=mem_mb, smp=1)
    workdir.mkdir(parents=True, exist_ok=True)
    size = mem_mb << 20
    timers = {side: WriteTimer(workdir / f"ram-{side}.img") for side in ("src", "dst")}
    out: dict = {}
    with QemuProcess(qemu, machine_args(qemu, cfg) + savedirtylog_args("ram-dst.img")
                     + ["-S", "-incoming", "defer"], workdir, "dst") as dst, \
            QemuProcess(qemu, machine_args(qemu, cfg) + savedirtylog_args("ram-src.img"), workdir, "src") as src:
        if src.serial.wait_for(READY_RE, 300, alive=src.alive) is None:
            raise SystemExit(f"guest did not boot: {src.output_tail()}")
        policy = MigrationPolicy(min_passes=1, timeout_s=600)
        start_incoming(src, dst, "unix:migrate.sock", policy)
        for t in timers.values():
            t.start()
        run_migration(src, dst, "unix:migrate.sock", policy, workdir / "timeline.jsonl")
        for side, t in timers.items():
            wait_for_image(t.path, size, timeout=60)
            t.join(timeout=5)
            t.stop()
            out[f"savedirtylog_{side}_s"] = t.seconds
        for side, proc in (("src", src), ("dst", dst)):
            target = workdir / f"pmemsave-{side}.img"
            t0 = time.perf_counter()
            proc.qmp("pmemsave", val=machine.ram_base, size=size, filename=target.name, timeout=600)
            t1 = time.perf_counter()
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            t2 = time.perf_counter()
            out[f"pmemsave_{side}_s"] = t1 - t0
            out[f"pmemsave_fsync_{side}_s"] = t2 - t0
    for p in workdir.glob("*.img"):
        p.unlink()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", default="10.0", choices=qemu_build.SUPPORTED)
    ap.add_argument("--sizes", default="256M,2G")
    ap.add_argument("--cold", action="store_true", help="really rebuild from nothing in a temporary cache")
    ap.add_argument("--artifacts", type=Path, help="dirtylog build output (default: built into a temp dir)")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    cache = Cache()
    quiet = lambda m: None  # noqa: E731

    if a.cold:
        with tempfile.TemporaryDirectory(prefix="dirtylog-cold-cache-") as tmp:
            t0 = time.perf_counter()
            b = qemu_build.build_patched_qemu(a.version, Cache(tmp), log=quiet)
            print(f"cold build (downloads included): {time.perf_counter() - t0:8.1f} s")
    b = qemu_build.build_patched_qemu(a.version, cache, log=lambda m: print(m, file=sys.stderr))
    if not a.cold:
        print(f"cold build (recorded when built): {b.build_seconds:8.1f} s")
    t0 = time.perf_counter()
    b = qemu_build.build_patched_qemu(a.version, cache, offline=True, log=quiet)
    print(f"cached build (cache hit):          {time.perf_counter() - t0:8.3f} s   {b.qemu_system_arm}")

    with tempfile.TemporaryDirectory(prefix="dirtylog-bench-", dir=a.workdir) as tmp:
        art_dir = a.artifacts
        if art_dir is None:
            art_dir = Path(tmp) / "artifacts"
            build_artifacts(art_dir)
        art = load_artifacts(art_dir)
        print(f"\n{'guest RAM':>10} {'side':>5} {'-savedirtylog':>14} {'pmemsave':>10} {'pmemsave+fsync':>15}")
        for text in a.sizes.split(","):
            mem_mb = parse_size(text)
            r = image_timings(b.qemu_system_arm, art, mem_mb, Path(tmp) / f"run-{mem_mb}")
            for side in ("src", "dst"):
                sd = r[f"savedirtylog_{side}_s"]
                print(f"{mem_mb:>7} MiB {side:>5} {sd:>13.3f}s {r[f'pmemsave_{side}_s']:>9.3f}s "
                      f"{r[f'pmemsave_fsync_{side}_s']:>14.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
