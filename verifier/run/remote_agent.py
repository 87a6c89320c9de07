#!/usr/bin/env python3
"""dirtylog's agent on a remote host (copied there by verifier.run.hosts and run with its python3).

Standard library only, Python 3.6+: it must run on whatever python3 the remote host has.

    remote_agent.py qemu [--heartbeat S] --dir DIR -- QEMU ARGS...
        Runs QEMU in DIR (its working directory; output in DIR/qemu.log) as a watchdog:
        prints "PID n", then "READY" once every unix socket named in a `path=` chardev option
        exists, and "EXIT rc" when QEMU ends; exits with QEMU's status (128+signal if killed).
        EOF on stdin (the controlling ssh session went away), SIGHUP or SIGTERM kill QEMU
        (SIGTERM, SIGKILL 3 s later); QEMU also gets PR_SET_PDEATHSIG, so it never outlives us.
        --heartbeat S: the controller writes to stdin every few seconds; S seconds without a
        byte also kill QEMU. A cut control link gives no EOF (sshd notices only with its
        ClientAliveInterval, often off), so this is what bounds it on any host.
    remote_agent.py digest IMAGE [--page-size N] [--headers]
        One blake2b-16 hex digest per page, one line each, in page order. --headers: then, for
        each page whose first 4 bytes are dirtyram's magic "DLPG", a line "H PAGE HEX" with the
        page's first 40 bytes (its dirtyram header) in hex, so the destination-only invariant
        can be checked without shipping the image (same single read of the image).
    remote_agent.py pages IMAGE [--page-size N] [p1 p2 ... | -]
        The raw bytes of the given pages, concatenated in the given order ("-": page numbers
        whitespace-separated on stdin).
    remote_agent.py size FILE          Size in bytes, or "missing".
    remote_agent.py free-port ADDRESS  A TCP port free on ADDRESS.
    remote_agent.py qemu-pids DIR      PIDs of QEMU processes whose working directory is below DIR.
"""

import ctypes
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

PAGE = 4096


def _pdeathsig():
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _say(line):
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass  # the controller is gone; the watchdog below still ends QEMU


def cmd_qemu(argv):
    heartbeat = None
    if argv[:1] == ["--heartbeat"] and len(argv) > 1:
        heartbeat = float(argv[1])
        argv = argv[2:]
    if len(argv) < 4 or argv[0] != "--dir" or argv[2] != "--":
        sys.exit("usage: remote_agent.py qemu [--heartbeat S] --dir DIR -- QEMU ARGS...")
    workdir, qemu = argv[1], argv[3:]
    os.makedirs(workdir, exist_ok=True)
    sockets = []
    for a in qemu:
        m = re.search(r"(?:^|,)path=([^,]+)", a)
        if m and a.startswith("socket"):
            path = m.group(1)
            sockets.append(path if os.path.isabs(path) else os.path.join(workdir, path))
    for s in sockets:
        try:
            os.unlink(s)
        except OSError:
            pass
    log = open(os.path.join(workdir, "qemu.log"), "wb")
    try:
        proc = subprocess.Popen(qemu, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=_pdeathsig)
    except OSError as exc:
        _say("NOEXEC %s" % exc)
        sys.exit(127)
    _say("PID %d" % proc.pid)
    lock = threading.Lock()

    def kill(reason):
        with lock:
            if proc.poll() is not None:
                return
            try:
                log.write(("\ndirtylog agent: stopping QEMU: %s\n" % reason).encode())
                log.flush()
            except (OSError, ValueError):
                pass
            proc.terminate()
        for _ in range(30):
            if proc.poll() is not None:
                return
            time.sleep(0.1)
        try:
            proc.kill()
        except OSError:
            pass

    def on_signal(signum, frame):
        threading.Thread(target=kill, args=("signal %d" % signum,), daemon=True).start()

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, on_signal)

    last_heard = [time.monotonic()]

    def watch_stdin():
        while True:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:
                kill("the controlling session went away (EOF on stdin)")
                return
            last_heard[0] = time.monotonic()

    def watch_heartbeat():
        while proc.poll() is None:
            silent = time.monotonic() - last_heard[0]
            if silent > heartbeat:
                kill("no heartbeat from the controller for %.0f s (control connection lost)" % silent)
                return
            time.sleep(0.5)

    threading.Thread(target=watch_stdin, daemon=True).start()
    if heartbeat:
        threading.Thread(target=watch_heartbeat, daemon=True).start()
    deadline = time.monotonic() + 30
    while proc.poll() is None and not all(os.path.exists(s) for s in sockets):
        if time.monotonic() > deadline:
            kill("its sockets did not appear within 30 s")
            break
        time.sleep(0.02)
    if proc.poll() is None:
        _say("READY")
    rc = proc.wait()
    rc = 128 - rc if rc < 0 else rc
    _say("EXIT %d" % rc)
    sys.exit(rc)


def _page_size(argv):
    if "--page-size" in argv:
        i = argv.index("--page-size")
        size = int(argv[i + 1])
        del argv[i:i + 2]
        return size
    return PAGE


HEADER_MAGIC = b"DLPG"
HEADER_SIZE = 40


def cmd_digest(argv):
    page = _page_size(argv)
    want_headers = "--headers" in argv
    if want_headers:
        argv.remove("--headers")
    out = sys.stdout.buffer
    lines = []
    headers = []
    index = 0
    with open(argv[0], "rb", buffering=0) as f:
        while True:
            chunk = f.read(page * 256)
            if not chunk:
                break
            for o in range(0, len(chunk), page):
                data = chunk[o:o + page]
                lines.append(hashlib.blake2b(data, digest_size=16).hexdigest().encode())
                if want_headers and data[:4] == HEADER_MAGIC and len(data) >= HEADER_SIZE:
                    headers.append(b"H %d %s" % (index, data[:HEADER_SIZE].hex().encode()))
                index += 1
            if len(lines) >= 4096:
                out.write(b"\n".join(lines) + b"\n")
                lines = []
    if lines:
        out.write(b"\n".join(lines) + b"\n")
    if headers:
        out.write(b"\n".join(headers) + b"\n")
    out.flush()


def cmd_pages(argv):
    page = _page_size(argv)
    image, rest = argv[0], argv[1:]
    if rest == ["-"]:
        rest = sys.stdin.read().split()
    out = sys.stdout.buffer
    with open(image, "rb", buffering=0) as f:
        for p in rest:
            data = os.pread(f.fileno(), page, int(p) * page)
            out.write(data.ljust(page, b"\0") if len(data) < page else data)
    out.flush()


def cmd_size(argv):
    try:
        print(os.stat(argv[0]).st_size)
    except OSError:
        print("missing")


def cmd_free_port(argv):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((argv[0], 0))
    print(s.getsockname()[1])
    s.close()


def cmd_qemu_pids(argv):
    base = os.path.realpath(argv[0])
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cwd = os.readlink("/proc/%s/cwd" % pid)
            exe = os.readlink("/proc/%s/exe" % pid)
        except OSError:
            continue
        if "qemu-system" in exe and (cwd == base or cwd.startswith(base + "/")):
            print(pid)


COMMANDS = {"qemu": cmd_qemu, "digest": cmd_digest, "pages": cmd_pages, "size": cmd_size,
            "free-port": cmd_free_port, "qemu-pids": cmd_qemu_pids}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit("usage: remote_agent.py %s ..." % "|".join(COMMANDS))
    COMMANDS[sys.argv[1]](sys.argv[2:])
