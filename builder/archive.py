"""Authenticated access to a Debian archive (mirror).

Chain of trust: ``dists/<suite>/InRelease`` is verified with gpgv against the
Debian archive keyring; its SHA256 list authenticates
``<component>/binary-<arch>/Packages.xz``; the Packages entries authenticate
the pool ``.deb`` files.  Every download goes through the content-addressed
cache with the hash known in advance.  The host's apt/dpkg state is neither
used nor modified.
"""

from __future__ import annotations

import dataclasses
import email.utils
import lzma
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Iterable

from debian.deb822 import Packages, Release
from debian.debfile import DebError, DebFile
from debian.debian_support import Version

from builder.cache import Cache, download_bytes
from builder.errors import BuildInputError, DownloadError, IntegrityError, ToolMissingError

__all__ = [
    "DEFAULT_KEYRING",
    "Archive",
    "MemberNotFoundError",
    "PackageNotFoundError",
    "PackageRecord",
    "extract_member",
    "extract_members",
    "list_members",
    "verify_inrelease",
]

DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class PackageNotFoundError(BuildInputError):
    """The requested package (or version) is not in the archive's Packages index."""


class MemberNotFoundError(BuildInputError):
    """A file the lock names is not inside the .deb."""


@dataclasses.dataclass(frozen=True)
class PackageRecord:
    name: str
    version: str
    arch: str
    filename: str  # pool path relative to the mirror's base URI
    size: int
    sha256: str


# --------------------------------------------------------------------------
# InRelease signature


_BEGIN_SIGNED = b"-----BEGIN PGP SIGNED MESSAGE-----"
_BEGIN_SIG = b"-----BEGIN PGP SIGNATURE-----"
_END_SIG = b"-----END PGP SIGNATURE-----"


def _check_clearsigned_shape(data: bytes, what: str) -> None:
    """Reject anything but exactly one clearsigned message with nothing around it.

    (gpgv alone would accept unsigned text before or after the signed block.)
    """
    lines = data.splitlines()
    stripped = [ln.rstrip() for ln in lines]
    if not stripped or stripped[0] != _BEGIN_SIGNED:
        raise IntegrityError(f"{what}: not an OpenPGP clearsigned file")
    if (
        stripped.count(_BEGIN_SIGNED) != 1
        or stripped.count(_BEGIN_SIG) != 1
        or stripped.count(_END_SIG) != 1
    ):
        raise IntegrityError(f"{what}: must contain exactly one signed message")
    end = stripped.index(_END_SIG)
    if any(ln.strip() for ln in stripped[end + 1:]):
        raise IntegrityError(f"{what}: unsigned data after the signature")


def verify_inrelease(data: bytes, keyring: Path = DEFAULT_KEYRING, what: str = "InRelease") -> bytes:
    """Verify a clearsigned InRelease with gpgv; return the signed text only.

    At least one good signature by a key in *keyring* is required and no bad
    signature is tolerated.  Raises IntegrityError otherwise.
    """
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise ToolMissingError("gpgv is not installed (Debian package 'gpgv')")
    keyring = Path(keyring).resolve()
    if not keyring.is_file():
        raise BuildInputError(f"keyring {keyring} not found (Debian package 'debian-archive-keyring')")
    _check_clearsigned_shape(data, what)
    with tempfile.TemporaryDirectory(prefix="dirtylog-gpgv-") as tmp:
        signed = Path(tmp, "InRelease")
        signed.write_bytes(data)
        out = Path(tmp, "content")
        home = Path(tmp, "home")
        home.mkdir(mode=0o700)
        proc = subprocess.run(
            [gpgv, "--homedir", str(home), "--status-fd", "1", "--keyring", str(keyring),
             "--output", str(out), str(signed)],
            stdin=subprocess.DEVNULL, capture_output=True, check=False,
        )
        status = [ln.split()[1:2] for ln in proc.stdout.decode(errors="replace").splitlines()
                  if ln.startswith("[GNUPG:] ")]
        words = {w[0] for w in status if w}
        if "BADSIG" in words or "GOODSIG" not in words or "VALIDSIG" not in words:
            detail = " ".join(proc.stderr.decode(errors="replace").split())[-300:]
            raise IntegrityError(
                f"{what}: no valid OpenPGP signature by a key in {keyring} "
                f"(gpgv exit {proc.returncode}: {detail})"
            )
        content = out.read_bytes() if out.exists() else b""
    if not content.strip():
        raise IntegrityError(f"{what}: signature is valid but the signed content is empty")
    return content


# --------------------------------------------------------------------------
# Archive


_PARA_SPLIT = re.compile(rb"\n(?:[ \t]*\n)+")
_PACKAGE_FIELD = re.compile(rb"^Package:[ \t]*(\S+)[ \t]*$", re.MULTILINE)


class Archive:
    """One suite of one Debian mirror, authenticated via its signed InRelease."""

    def __init__(
        self,
        mirror: str,
        suite: str,
        cache: Cache,
        *,
        keyring: Path = DEFAULT_KEYRING,
        component: str = "main",
        progress: bool = True,
    ) -> None:
        self.mirror = mirror.rstrip("/")
        self.suite = suite
        self.cache = cache
        self.keyring = Path(keyring)
        self.component = component
        self.progress = progress
        self._release: Release | None = None
        self._packages: dict[str, bytes] = {}  # arch -> decompressed Packages

    def __repr__(self) -> str:
        return f"Archive({self.mirror!r}, {self.suite!r})"

    # -- Release ----------------------------------------------------------

    @property
    def inrelease_url(self) -> str:
        return f"{self.mirror}/dists/{self.suite}/InRelease"

    def release(self) -> Release:
        """The verified Release paragraph (fetched and checked once)."""
        if self._release is None:
            url = self.inrelease_url
            content = verify_inrelease(download_bytes(url), self.keyring, what=url)
            rel = Release(content)
            names = {rel.get("Suite"), rel.get("Codename")}
            if self.suite not in names:
                raise IntegrityError(
                    f"{url}: signed for suite {rel.get('Suite')!r} / codename "
                    f"{rel.get('Codename')!r}, not {self.suite!r}"
                )
            valid_until = rel.get("Valid-Until")
            if valid_until and _parse_date(valid_until, url) < time.time():
                raise IntegrityError(f"{url}: expired (Valid-Until: {valid_until})")
            self._release = rel
        return self._release

    def release_date(self) -> int:
        """The InRelease ``Date`` as epoch seconds."""
        return _parse_date(self.release()["Date"], self.inrelease_url)

    def _index_entry(self, name: str) -> tuple[str, int]:
        for entry in self.release().get("SHA256", []):
            if entry["name"] == name:
                return entry["sha256"].lower(), int(entry["size"])
        raise IntegrityError(f"{self.inrelease_url}: no SHA256 entry for {name}")

    # -- Packages ---------------------------------------------------------

    def index_bytes(self, rel_path: str) -> bytes:
        """A signed index (e.g. main/binary-armhf/Packages.xz), fetched by hash and decompressed."""
        sha, size = self._index_entry(rel_path)
        directory, name = rel_path.rsplit("/", 1)
        base = f"{self.mirror}/dists/{self.suite}/{directory}"
        path = self.cache.get(sha)
        if path is None:
            urls = [f"{base}/{name}"]
            if str(self.release().get("Acquire-By-Hash", "no")).lower() == "yes":
                urls.insert(0, f"{base}/by-hash/SHA256/{sha}")
            for i, url in enumerate(urls):
                try:
                    path = self.cache.put_from_download(url, sha, size, progress=self.progress)
                    break
                except IntegrityError:
                    raise
                except DownloadError:
                    if i == len(urls) - 1:
                        raise
        try:
            return lzma.decompress(path.read_bytes())
        except lzma.LZMAError as e:
            raise IntegrityError(f"{base}/{name}: cannot decompress: {e}") from e

    def _packages_bytes(self, arch: str) -> bytes:
        if arch not in self._packages:
            self._packages[arch] = self.index_bytes(f"{self.component}/binary-{arch}/Packages.xz")
        return self._packages[arch]

    def find(self, arch: str, predicate: Callable[[str], bool]) -> list[PackageRecord]:
        """All Packages entries whose package name satisfies *predicate*."""
        data = self._packages_bytes(arch)
        chunks = []
        for chunk in _PARA_SPLIT.split(data):
            m = _PACKAGE_FIELD.search(chunk)
            if m and predicate(m.group(1).decode("utf-8", "replace")):
                chunks.append(chunk)
        out = []
        for para in Packages.iter_paragraphs(b"\n\n".join(chunks).splitlines(keepends=True),
                                             use_apt_pkg=False):
            try:
                out.append(PackageRecord(
                    name=para["Package"],
                    version=para["Version"],
                    arch=para["Architecture"],
                    filename=para["Filename"],
                    size=int(para["Size"]),
                    sha256=para["SHA256"].lower(),
                ))
            except (KeyError, ValueError) as e:
                raise IntegrityError(
                    f"Packages entry for {para.get('Package')!r} ({arch}) is malformed: {e!r}"
                ) from e
        return out

    def resolve(self, package: str, arch: str, version: str | None = None) -> PackageRecord:
        """The entry for *package* (highest version, or exactly *version*)."""
        records = [r for r in self.find(arch, lambda n: n == package)
                   if version is None or r.version == version]
        if not records:
            what = f"{package} {version}" if version else package
            raise PackageNotFoundError(
                f"{what} ({arch}) is not in {self.mirror} {self.suite}/{self.component}"
            )
        return max(records, key=lambda r: Version(r.version))

    # -- pool files -------------------------------------------------------

    def pool_url(self, filename: str) -> str:
        if filename.startswith("/") or ".." in filename.split("/"):
            raise IntegrityError(f"refusing suspicious pool path {filename!r}")
        return f"{self.mirror}/{filename}"

    def download(self, record: PackageRecord) -> Path:
        """Download (or find in the cache) the .deb of *record*; verified."""
        return self.cache.put_from_download(
            self.pool_url(record.filename), record.sha256, record.size, progress=self.progress
        )


def _parse_date(value: str, what: str) -> int:
    try:
        return int(email.utils.parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError) as e:
        raise IntegrityError(f"{what}: cannot parse date {value!r}") from e


# --------------------------------------------------------------------------
# .deb contents


def _norm(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _open_deb(deb_path: Path) -> DebFile:
    try:
        return DebFile(str(deb_path))
    except (DebError, OSError, EOFError) as e:
        raise IntegrityError(f"{deb_path}: not a valid .deb: {e}") from e


def list_members(deb_path: Path | str) -> list[str]:
    """Names in the .deb's data.tar.*, without a leading ``./`` (root omitted)."""
    with _open_deb(Path(deb_path)) as deb:
        try:
            return [n for n in (_norm(x) for x in deb.data.tgz().getnames()) if n]
        except DebError as e:
            raise IntegrityError(f"{deb_path}: {e}") from e


def extract_members(deb_path: Path | str, members: Iterable[str]) -> dict[str, bytes]:
    """Contents of several files of the .deb's data.tar.*, in one sequential pass.

    Member names may be given with or without a leading ``./`` or ``/``.
    Regular files and links (resolved inside the package) are accepted;
    anything else, or a missing name, raises MemberNotFoundError.  The result
    is keyed by the names as given.
    """
    members = list(members)
    wanted = {_norm(m) for m in members}
    found: dict[str, bytes] = {}
    names: list[str] = []
    with _open_deb(Path(deb_path)) as deb:
        try:
            tf = deb.data.tgz()
            for ti in tf:
                n = _norm(ti.name)
                names.append(n)
                if n in wanted and n not in found and (ti.isreg() or ti.issym() or ti.islnk()):
                    try:
                        f = tf.extractfile(ti)
                    except KeyError:  # dangling link
                        continue
                    if f is not None:
                        found[n] = f.read()
                if len(found) == len(wanted):
                    break
        except (DebError, tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as e:
            raise IntegrityError(f"{deb_path}: cannot read data archive: {e}") from e
    missing = [m for m in members if _norm(m) not in found]
    if missing:
        hints = []
        for m in missing:
            base = m.rsplit("/", 1)[-1]
            hints += [n for n in names if n.rsplit("/", 1)[-1] == base and n not in hints]
        hint = f"; files with the same name: {', '.join(hints[:5])}" if hints else ""
        raise MemberNotFoundError(
            f"{deb_path}: no file {', '.join(repr(_norm(m)) for m in missing)}{hint}"
        )
    return {m: found[_norm(m)] for m in members}


def extract_member(deb_path: Path | str, member: str) -> bytes:
    """Content of one regular file of the .deb's data.tar.*."""
    return extract_members(deb_path, [member])[member]

