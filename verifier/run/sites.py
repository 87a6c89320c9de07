"""Where a trial's source and destination run: a `Sites` says what depends on the place.

`LocalSites`: both QEMUs on this machine, run directly, every capture method.
`HostSites`: a source and a destination `Host` (verifier.run.hosts), this machine or another.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import time
from pathlib import Path

from verifier.analysis.compare import compare_images
from verifier.analysis.remote_compare import RemoteImage, compare_remote_images, diagnose_remote
from verifier.capture import ram as _capture
from verifier.reports.report import diagnose_trial
from verifier.run.hosts import TwoHosts, prepare_hosts, resolve_capture
from verifier.run.qemu import QemuBinary, QemuProcess
from verifier.run.remote_qemu import RemoteQemu, short_socket_dir, wait_remote_image
from verifier.run.trial import Sites, run_trial


class LocalSites(Sites):
    """Source and destination on this machine, one QEMU binary, any capture method."""

    def __init__(self, qemu: QemuBinary, capture: str):
        self.binaries = {"src": qemu, "dst": qemu}
        self.capture = capture

    def guest_files(self, side, art, machine):
        return {"kernel": art.kernel.resolve(), "initrd": art.initrd.resolve(),
                "dtb": art.dtb.resolve() if art.dtb and machine.needs_dtb else None}

    def ram_file(self, side):
        return f"{side}.ram" if self.capture == "backing-file" else None

    def migration_uri(self, opts):
        if opts.transport == "unix":
            return "unix:migrate.sock"  # relative to the trial directory, the QEMUs' working directory
        return f"tcp:{opts.migration_address}:{_free_tcp_port(opts.migration_address)}"

    def qemu(self, side, args, tdir, reporter, gdb):
        return QemuProcess(self.binaries[side], args, tdir, side, on_qmp=reporter.detail, gdb=gdb)

    def stream_tap(self, opts, uri, tdir, machine):
        from verifier.run.streamtap import StreamTap
        if uri.startswith("unix:"):
            # The destination's socket is relative to the trial directory (the QEMUs' cwd); the tap
            # reaches any path. The source is given the tap's, in a short private directory.
            self._tap_dir = short_socket_dir()
            target, listen = f"unix:{tdir.resolve()}/{uri[5:]}", f"unix:{self._tap_dir}/tap.sock"
        else:
            target, listen = uri, f"tcp:{opts.migration_address}:0"
        inject = opts.inject if opts.inject and opts.inject[0].startswith("stream-") else None
        return StreamTap(listen, target, tdir, ram_block_bytes=opts.mem_mb << 20, record=opts.record_stream,
                         page_size=machine.target_page_size, xbzrle=bool(opts.capabilities.get("xbzrle")),
                         inject=inject)

    def release(self):
        if getattr(self, "_tap_dir", None) is not None:
            shutil.rmtree(self._tap_dir, ignore_errors=True)
            self._tap_dir = None

    def capture_images(self, src, dst, tdir, ram_base, mem_mb):
        return _capture.capture(self.capture, src, dst, tdir, ram_base, mem_mb)

    def compare(self, trial, images, mem_mb, ram_base, tdir):
        result = compare_images(images["src"], images["dst"])
        diagnose_trial(trial, result, ram_base)
        return result

    def after_resume(self, tdir):
        _capture.cleanup(self.capture, tdir)


def _free_tcp_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]



class HostSites(Sites):
    """Source on hosts.src, destination on hosts.dst (either may be this machine's LocalHost).

    Files: the guest's kernel, initrd and dtb are copied into each host's file cache. Migration:
    TCP to hosts.migration_address on a port free there. Capture: -savedirtylog or pmemsave into
    each host's run directory. Comparison: page digests on each host, differing pages fetched
    (trial.compare['transfer'] and trial.compare['hosts'] say what moved where).
    """

    def __init__(self, hosts: TwoHosts, binaries: dict[str, QemuBinary], capture: str):
        self.hosts = hosts
        self.binaries = binaries
        self.capture = capture
        self.host = {"src": hosts.src, "dst": hosts.dst}
        self.remote_dirs: dict[str, str] = {}
        self.uploaded: dict[str, int] = {"src": 0, "dst": 0}
        self.sock_dir: Path | None = None
        self.uri = ""

    def begin(self, trial):
        # short: the sockets in it must fit a unix socket path (107 bytes) on the host
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}-t{trial.index:02d}"
        self.remote_dirs = {side: f"{h.base_dir}/runs/{run_id}/{side}" for side, h in self.host.items()}

    def route(self):
        return f"{self.hosts.src.name} -> {self.hosts.dst.name}"

    def where(self, side):
        return f" on {self.host[side].name}"

    def guest_files(self, side, art, machine):
        files, sent = {"dtb": None}, 0
        for key, path in (("kernel", art.kernel), ("initrd", art.initrd),
                          ("dtb", art.dtb if art.dtb and machine.needs_dtb else None)):
            if path is not None:
                files[key], n = self.host[side].put_cached(Path(path).resolve())
                sent += n
        self.uploaded[side] = sent
        return files

    def capture_args(self, side):
        from verifier.capture.savedirtylog import savedirtylog_args
        return savedirtylog_args(f"ram-{side}.img") if self.capture == "savedirtylog" else []

    def migration_uri(self, opts):
        port = int(self.hosts.dst.agent("free-port", self.hosts.migration_address).stdout.decode().strip())
        self.uri = f"tcp:{self.hosts.migration_address}:{port}"
        return self.uri

    def qemu(self, side, args, tdir, reporter, gdb):
        if self.sock_dir is None:
            self.sock_dir = short_socket_dir()
        return RemoteQemu(self.host[side], self.binaries[side], args, tdir, self.remote_dirs[side], side,
                          self.sock_dir, on_qmp=reporter.detail, gdb=gdb)

    def describe_devices(self, args, tdir, page_size):
        return None  # a describing QEMU would run on a host, and the stream tap brings the description

    def stream_tap(self, opts, uri, tdir, machine):
        """The tap on the destination host (verifier.run.remote_tap), between the migration network
        and the destination QEMU; None, with `no_tap` saying why, if that host's python3 cannot run it."""
        from verifier.run.remote_tap import RemoteStreamTap, agent_zip, python_ok
        host = self.host["dst"]
        why = python_ok(host)
        if why:
            self.no_tap = why
            return None
        remote_zip, sent = host.put_cached(agent_zip(tdir.parent))
        self.uploaded["dst"] += sent
        inject = opts.inject if opts.inject and opts.inject[0].startswith("stream-") else None
        return RemoteStreamTap(host, remote_zip, self.remote_dirs["dst"], f"tcp:{self.hosts.migration_address}:0",
                               uri, tdir, ram_block_bytes=opts.mem_mb << 20, record=opts.record_stream,
                               page_size=machine.target_page_size, xbzrle=bool(opts.capabilities.get("xbzrle")),
                               inject=inject, max_seconds=opts.migration_timeout_s + 600)

    def capture_images(self, src, dst, tdir, ram_base, mem_mb):
        from verifier.errors import CaptureError
        size = mem_mb * 1024 * 1024
        images = {side: RemoteImage(self.host[side], f"{self.remote_dirs[side]}/ram-{side}.img")
                  for side in ("src", "dst")}
        for proc in (src, dst):
            if self.capture == "savedirtylog":  # written by QEMU itself before the migration ended
                wait_remote_image(proc, images[proc.name].path, size)
            else:
                proc.qmp("pmemsave", val=ram_base, size=size, filename=f"ram-{proc.name}.img", timeout=300)
        for side, img in images.items():
            got = img.host.agent("size", img.path).stdout.decode().strip()
            if got != str(size):
                raise CaptureError(f"{side} RAM image {img.host.name}:{img.path} has {got} bytes instead of {size}")
        return images

    def save_device_state(self, proc, tdir):
        """Saved into the host's run directory (the QEMU's working directory), then fetched into the
        trial directory: a few tens of KiB."""
        from verifier.capture import devstate
        name = f"devstate-{proc.name}.bin"
        devstate.save_as(proc, name)
        remote = f"{self.remote_dirs[proc.name]}/{name}"
        data = self.host[proc.name].run(["cat", remote], what=f"fetch {remote}").stdout
        local = (tdir / name).resolve()
        local.write_bytes(data)
        return local

    def release(self):
        if self.sock_dir is not None:
            for p in self.sock_dir.iterdir():
                p.unlink(missing_ok=True)
            self.sock_dir.rmdir()
            self.sock_dir = None

    def compare(self, trial, images, mem_mb, ram_base, tdir):
        cmp, transfer = compare_remote_images(images["src"], images["dst"], mem_mb * 1024 * 1024, tdir)
        diagnose_remote(trial, cmp, ram_base, Path(transfer["dst_headers_image"]))
        trial.compare["transfer"] = transfer
        trial.compare["hosts"] = {"src": self.hosts.src.name, "dst": self.hosts.dst.name, "migration_uri": self.uri,
                                  "capture": self.capture, "remote_dirs": dict(self.remote_dirs),
                                  "bytes_uploaded": dict(self.uploaded)}
        return cmp

    def image_names(self, images):
        return {side: f"{img.host.name}:{img.path}" for side, img in images.items()}

    def delete_images(self, images):
        for img in images.values():
            img.host.run(["rm", "-f", img.path], check=False, what="rm image")


def run_two_host_trial(trial, art, opts, hosts: TwoHosts, machine, accel: tuple[str, str],
                       reporter, binaries: dict[str, QemuBinary] | None = None) -> None:
    """One trial (verifier.trial.run_trial) with the source on hosts.src and the destination on hosts.dst."""
    binaries = binaries or prepare_hosts(hosts)
    sites = HostSites(hosts, binaries, resolve_capture(opts, hosts, binaries))
    run_trial(trial, art, opts, sites, machine, accel, reporter)


