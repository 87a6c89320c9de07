"""`dirtylog doctor`: what this host has and lacks for dirtylog, and what to install.

Each check is "ok", "missing" (with the Debian packages that provide it), "warn" or "info".
Checks marked required are what `dirtylog make-and-verify` needs: qemu-system-arm >= 6.0, the
armhf cross-compiler and its libc, make, gpgv and Debian's archive keyring, free disk for the
cache, the artifacts and two RAM images, and memory for two 256 MiB guests. The rest (other
QEMU system emulators, KVM, a container engine, other cross-compilers, huge pages) is reported for
information. Exit code: 0 when every required check is ok, 2 otherwise.

KVM: presence of /dev/kvm, whether this user can open it and which module is loaded. Whether
KVM really runs a guest is only known by booting one: doctor does not boot anything.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

MIN_DISK_MIB = 2048
MIN_MEM_MIB = 2 * (256 + 200)
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


@dataclass
class Check:
    name: str
    status: str  # ok | missing | warn | info
    detail: str
    required: bool = False
    install: str = ""  # Debian packages, space-separated

    def to_dict(self) -> dict:
        return asdict(self)


def _run(cmd: list[str], timeout: float = 10.0) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return p.returncode, (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, str(exc)


def check_qemu(binary: str, package: str, required: bool) -> Check:
    from verifier.errors import InputError
    from verifier.run.qemu import identify_qemu
    path = shutil.which(binary)
    if not path:
        return Check(binary, "missing" if required else "info", "not on PATH", required, package)
    rc, out = _run([path, "--version"])
    try:
        qemu = identify_qemu(path, rc, out)
    except InputError as exc:
        return Check(binary, "missing" if required else "warn", str(exc)[:300], required, package)
    return Check(binary, "ok", f"{path}: QEMU {qemu.version_str}", required)


def check_tool(binary: str, package: str, required: bool, what: str = "") -> Check:
    path = shutil.which(binary)
    if not path:
        return Check(binary, "missing" if required else "info", f"not on PATH{(' (' + what + ')') if what else ''}",
                     required, package)
    rc, out = _run([path, "--version"])
    first = out.splitlines()[0] if out else ""
    return Check(binary, "ok", f"{path}: {first[:120]}", required)


def check_kvm() -> Check:
    dev = Path("/dev/kvm")
    modules = []
    try:
        modules = [line.split()[0] for line in Path("/proc/modules").read_text().splitlines()
                   if line.startswith("kvm")]
    except OSError:
        pass
    mod = f"modules: {', '.join(modules)}" if modules else "no kvm module loaded (or built in)"
    if not dev.exists():
        return Check("kvm", "info", f"/dev/kvm absent; {mod}. dirtylog runs TCG without it", False,
                     "qemu-system-arm (and a host with virtualization enabled)")
    try:
        st = dev.stat()
        import grp
        group = grp.getgrgid(st.st_gid).gr_name
        perms = f"mode {oct(st.st_mode & 0o777)}, group {group}"
    except (OSError, KeyError):
        perms = "permissions unknown"
    try:
        os.close(os.open(dev, os.O_RDWR))
        usable = "openable by this user"
    except OSError as exc:
        return Check("kvm", "warn", f"/dev/kvm present ({perms}) but not openable: {exc.strerror} "
                     f"(add the user to group kvm); {mod}")
    import platform
    note = "" if platform.machine() == "aarch64" else f"; this is a {platform.machine()} host: an armv7 guest cannot use KVM here"
    return Check("kvm", "info", f"/dev/kvm present, {perms}, {usable}; {mod}{note} (whether KVM really works is "
                 "only known by booting a guest)")


def check_container_engine() -> Check:
    found = []
    for engine in ("docker", "podman"):
        path = shutil.which(engine)
        if not path:
            continue
        rc, out = _run([path, "version", "--format", "{{.Server.Version}}" if engine == "docker" else "{{.Version}}"],
                       timeout=8)
        found.append(f"{engine} {'answers: ' + out.splitlines()[0] if rc == 0 and out else 'not answering: ' + (out.splitlines()[-1] if out else 'no output')[:120]}")
    if not found:
        return Check("container engine", "info", "neither docker nor podman found (not needed by dirtylog)",
                     False, "podman")
    return Check("container engine", "info", "; ".join(found))


def check_keyring() -> Check:
    if KEYRING.is_file():
        return Check("debian-archive-keyring", "ok", str(KEYRING), True)
    return Check("debian-archive-keyring", "missing", f"{KEYRING} not found", True, "debian-archive-keyring")


def check_disk(path: Path) -> Check:
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize // 2**20
    status = "ok" if free >= MIN_DISK_MIB else "missing"
    return Check("disk", status, f"{free} MiB free in {path} (need {MIN_DISK_MIB} MiB: download cache, "
                 "artifacts, two RAM images per trial)", True)


def _meminfo() -> dict:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            parts = v.split()
            if parts:
                out[k] = int(parts[0])
    except (OSError, ValueError):
        pass
    return out


def check_memory() -> Check:
    mi = _meminfo()
    avail = mi.get("MemAvailable", 0) // 1024
    status = "ok" if avail >= MIN_MEM_MIB else "missing"
    return Check("memory", status, f"{avail} MiB available of {mi.get('MemTotal', 0) // 1024} MiB (need "
                 f"{MIN_MEM_MIB} MiB for two 256 MiB guests)", True)


def check_hugepages() -> Check:
    mi = _meminfo()
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
        thp_mode = re.search(r"\[(\w+)\]", thp).group(1)
    except (OSError, AttributeError):
        thp_mode = "unknown"
    return Check("huge pages", "info",
                 f"HugePages_Total {mi.get('HugePages_Total', 0)}, HugePages_Free {mi.get('HugePages_Free', 0)}, "
                 f"Hugepagesize {mi.get('Hugepagesize', 0)} kB; transparent huge pages: {thp_mode} "
                 "(dirtylog's RAM backing uses normal pages)")


def run_checks(cwd: Path | None = None) -> list[Check]:
    cwd = Path(cwd or os.getcwd())
    return [
        check_qemu("qemu-system-arm", "qemu-system-arm", True),
        check_qemu("qemu-system-aarch64", "qemu-system-arm", False),
        check_qemu("qemu-system-x86_64", "qemu-system-x86", False),
        check_kvm(),
        check_container_engine(),
        check_tool("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf libc6-dev-armhf-cross", True,
                   "builds dirtyram"),
        _armhf_libc(),
        check_tool("make", "make", True, "builds dirtyram"),
        check_tool("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", False, "tests only"),
        check_tool("arm-linux-gnueabi-gcc", "gcc-arm-linux-gnueabi", False, "tests only"),
        check_tool("qemu-arm-static", "qemu-user-static", False, "tests only"),
        check_tool("gpgv", "gpgv", True, "authenticates the Debian archive"),
        check_keyring(),
        check_disk(cwd),
        check_memory(),
        check_hugepages(),
    ]


def _armhf_libc() -> Check:
    crt = Path("/usr/arm-linux-gnueabihf/lib/libc.a")
    if crt.is_file():
        return Check("armhf static libc", "ok", str(crt), True)
    return Check("armhf static libc", "missing", f"{crt} not found (dirtyram is linked statically)", True,
                 "libc6-dev-armhf-cross")


def exit_code(checks: list[Check]) -> int:
    return 0 if all(c.status == "ok" for c in checks if c.required) else 2


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        tag = {"ok": "ok     ", "missing": "MISSING", "warn": "warn   ", "info": "info   "}[c.status]
        lines.append(f"{tag} {c.name:<{width}}  {c.detail}" + ("" if c.required else "  [optional]"))
        if c.install and c.status != "ok":
            lines.append(f"{'':7} {'':<{width}}  install: apt-get install {c.install}")
    missing = sorted({p for c in checks if c.required and c.status != "ok" and c.install for p in c.install.split()})
    if exit_code(checks) == 0:
        lines.append("ready for `dirtylog make-and-verify`")
    else:
        lines.append("not ready for `dirtylog make-and-verify`"
                     + (f": apt-get install -y {' '.join(missing)}" if missing else ""))
    return "\n".join(lines) + "\n"
