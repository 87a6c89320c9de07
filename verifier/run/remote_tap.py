"""The stream tap on another host: runs where the destination QEMU runs, across hosts.

A migration between two hosts goes from the source QEMU straight over the migration network to
the destination host. The tap (verifier.run.streamtap.StreamTap: forwarding, parsing, the page
ledger, the stream injections) therefore runs on the destination host, between the network and
the destination QEMU, as its own process: dirtylog's `verifier` package, zipped
(`agent_zip`: deterministic, so each host's file cache keeps one copy per version), is run there
with the host's python3 (which must be 3.11 or newer, as for dirtylog itself; an older one makes
the trial run without the tap and the report says so):

    python3 verifier-<hash>.zip tap --listen tcp:ADDR:0 --target tcp:ADDR:PORT --dir RUN_DIR ...

It prints one JSON line, {"listen": URI}, the address the source migrates to. When the migration is
over the controller copies the trial's timeline.jsonl into RUN_DIR (the sync table reads it) and
writes "close"; the tap then closes and writes the page ledger (tap-ledger.bin,
PageLedger.save: 16 bytes per target page) and the stream's device sections with the
VMDESCRIPTION (tap-devices.json), prints its result as one JSON line and exits. EOF on its standard
input (the controlling ssh went away) or `--max-seconds` without "close" end it the same way, so
it never outlives a run. The controller fetches the two files (the ledger and a few tens of KiB),
never the stream: what crosses to the controller is the ledger, as the page digests are for RAM.

Recorded channels (--record-stream) stay in the destination host's run directory; the report
names them host:path. The sync table compares the tap host's clock with the source's
MIGRATION_PASS event times: across hosts that assumes clocks that agree (NTP) to better than a
RAM section (tens of ms); the socket-buffer bound is the tap host's.
"""

from __future__ import annotations

import argparse
import io
import json
import queue
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

from verifier.errors import VerifyError

START_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 300.0
MIN_PYTHON = (3, 11)
_MAIN = "import sys\nfrom verifier.run.remote_tap import main\nsys.exit(main(sys.argv[1:]))\n"


class RemoteTapError(VerifyError):
    """The tap on the destination host did not start, or did not report."""


def agent_zip(out_dir: Path) -> Path:
    """The `verifier` package (its .py and .json files) and a __main__ in one zip, byte-identical for
    the same sources (fixed timestamps, sorted names): out_dir/verifier-<hash>.zip."""
    import hashlib
    root = Path(__file__).resolve().parent.parent  # the verifier package
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        def add(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
        add("__main__.py", _MAIN.encode())
        for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json") and "__pycache__" not in p.parts):
            add(f"verifier/{f.relative_to(root).as_posix()}", f.read_bytes())
    data = buf.getvalue()
    path = out_dir / f"verifier-{hashlib.sha256(data).hexdigest()[:16]}.zip"
    if not path.exists():
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def python_ok(host) -> str | None:
    """None if the host's python3 can run the tap, else why not (one sentence)."""
    res = host.run([host.python, "-c", "import sys; print('%d %d' % sys.version_info[:2])"], check=False,
                   what="python3 version")
    try:
        version = tuple(int(x) for x in res.stdout.split()[:2])
    except ValueError:
        version = ()
    if len(version) != 2:
        return f"{host.name}: cannot run {host.python}"
    if version < MIN_PYTHON:
        return (f"the stream tap runs on the destination host, and {host.name}'s {host.python} is "
                f"{version[0]}.{version[1]} (it needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer)")
    return None


class _Injection:
    """What the remote tap's StreamInjector did (the interface the trial reads)."""

    def __init__(self, data: dict):
        self._data = data

    def injection(self) -> dict:
        return dict(self._data)


class RemoteStreamTap:
    """StreamTap's interface (listen_uri, close, ledger, injector, device_state) for a tap on `host`."""

    def __init__(self, host, remote_zip: str, remote_dir: str, listen: str, target: str, tdir: Path, *,
                 ram_block_bytes: int, record: bool, page_size: int, xbzrle: bool, inject=None,
                 max_seconds: float = 3600.0):
        self.host, self.remote_dir, self.tdir = host, remote_dir, tdir
        self.argv = [host.python, "-u", remote_zip, "tap", "--listen", listen, "--target", target,
                     "--dir", remote_dir, "--ram-block-bytes", str(ram_block_bytes), "--page-size", str(page_size),
                     "--max-seconds", str(int(max_seconds))]
        self.argv += ["--record"] if record else []
        self.argv += ["--xbzrle"] if xbzrle else []
        self.argv += ["--inject", f"{inject[0]}:{inject[1]}"] if inject else []
        self.inject = inject
        self.listen_uri = ""
        self.ledger = None
        self.injector = None
        self.proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._result: dict | None = None
        self._devices: tuple[list, dict | None] | None = None
        self._err = tdir / "tap-agent.log"
        self._fetched = 0  # bytes fetched from the host after the tap closed

    # -- the process --------------------------------------------------------------------------
    def __enter__(self):
        try:
            self.proc = subprocess.Popen(self.host._argv(self.argv), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=open(self._err, "wb"))
        except OSError as exc:
            raise RemoteTapError(f"cannot start the stream tap on {self.host.name}: {exc}") from None
        threading.Thread(target=self._read, daemon=True).start()
        first = self._line(START_TIMEOUT_S, "start")
        self.listen_uri = first["listen"]
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _line(self, timeout: float, what: str) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RemoteTapError(f"the stream tap on {self.host.name} did not {what} within {timeout:.0f} s "
                                 f"(see {self._err})") from None
        if line is None:
            tail = self._err.read_text(errors="replace").strip().splitlines()[-1:] if self._err.exists() else []
            raise RemoteTapError(f"the stream tap on {self.host.name} exited before it could {what}"
                                 + (f": {tail[0]}" if tail else f" (see {self._err})"))
        return json.loads(line)

    def __exit__(self, *exc):
        try:
            if self._result is None and self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        finally:
            if self.proc is not None:
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()

    # -- the end ------------------------------------------------------------------------------
    def close(self) -> dict:
        if self._result is not None:
            return self._result
        timeline = self.tdir / "timeline.jsonl"
        if timeline.exists():
            self.host.put(timeline, f"{self.remote_dir}/timeline.jsonl")
        try:
            self.proc.stdin.write(b"close\n")
            self.proc.stdin.close()
        except OSError:
            pass  # it ended already: the next line says why
        out = self._line(CLOSE_TIMEOUT_S, "report")
        result = out["result"]
        result["host"] = self.host.name
        for c in result.get("channels", []):
            if c.get("recorded"):
                c["recorded"] = f"{self.host.name}:{c['recorded']}"
        if out.get("ledger"):
            from verifier.analysis.provenance import PageLedger
            self.ledger = PageLedger.load(self._fetch("tap-ledger.bin"))
        if out.get("devices"):
            dev = json.loads(self._fetch("tap-devices.json"))
            self._devices = ([(s, bytes.fromhex(b)) for s, b in dev["sections"]], dev["vmdesc"])
        if self.inject:
            self.injector = _Injection(out.get("injection") or {"kind": self.inject[0], "records": [], "pages": []})
        result["fetched_bytes"] = self._fetched
        self._result = result
        return result

    def _fetch(self, name: str) -> bytes:
        data = self.host.run(["cat", f"{self.remote_dir}/{name}"], what=f"fetch {name}").stdout
        self._fetched += len(data)
        return data

    def device_state(self) -> tuple[list, dict | None] | None:
        return self._devices


# -- the process on the destination host --------------------------------------------------------

def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="verifier.zip", description="dirtylog's stream tap on a host")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tap")
    t.add_argument("--listen", required=True)
    t.add_argument("--target", required=True)
    t.add_argument("--dir", required=True, type=Path)
    t.add_argument("--ram-block-bytes", required=True, type=int)
    t.add_argument("--page-size", required=True, type=int)
    t.add_argument("--record", action="store_true")
    t.add_argument("--xbzrle", action="store_true")
    t.add_argument("--inject")
    t.add_argument("--max-seconds", type=float, default=3600.0)
    a = ap.parse_args(argv)
    from verifier.run.streamtap import StreamTap
    inject = None
    if a.inject:
        kind, _, n = a.inject.partition(":")
        inject = (kind, int(n or 1))
    tap = StreamTap(a.listen, a.target, a.dir, ram_block_bytes=a.ram_block_bytes, record=a.record,
                    page_size=a.page_size, xbzrle=a.xbzrle, inject=inject)
    with tap:
        print(json.dumps({"listen": tap.listen_uri}), flush=True)
        done = threading.Event()

        def wait_close() -> None:
            sys.stdin.readline()  # "close", or EOF when the controller is gone
            done.set()
        threading.Thread(target=wait_close, daemon=True).start()
        done.wait(a.max_seconds)
        result = tap.close()
    if tap.ledger is not None:
        tap.ledger.save(a.dir / "tap-ledger.bin")
    dev = tap.device_state()
    if dev is not None:
        sections, vmdesc = dev
        (a.dir / "tap-devices.json").write_text(json.dumps({"sections": [(s, b.hex()) for s, b in sections],
                                                            "vmdesc": vmdesc}))
    out = {"result": result, "ledger": tap.ledger is not None, "devices": dev is not None,
           "injection": tap.injector.injection() if tap.injector is not None else None}
    print(json.dumps(out), flush=True)
    return 0
