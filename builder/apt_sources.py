"""Find a Debian mirror in the machine's apt configuration.

Only reads the configuration; never modifies it.  Both formats are
understood: the one-line format of ``sources.list`` / ``sources.list.d/*.list``
and the deb822 format of ``sources.list.d/*.sources``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

from debian.deb822 import Deb822

from builder.errors import BuildInputError

__all__ = ["SourceEntry", "iter_source_entries", "find_mirror"]

# Values apt's StringToBool treats as false.
_FALSE_WORDS = {"no", "false", "without", "off", "disable", "0"}
# URI schemes we can download from with requests.
_SUPPORTED_SCHEMES = ("http://", "https://")


@dataclasses.dataclass(frozen=True)
class SourceEntry:
    """One (type, URI) combination of an apt source, after expansion."""

    type: str  # "deb" or "deb-src"
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    enabled: bool
    origin: Path  # file it was read from


def _source_files(sources_dir: Path) -> list[Path]:
    files = []
    main = sources_dir / "sources.list"
    if main.is_file():
        files.append(main)
    d = sources_dir / "sources.list.d"
    if d.is_dir():
        # apt reads the parts directory in alphabetical order; other
        # extensions (.save, .disabled, ...) are ignored like apt does.
        files.extend(
            sorted(p for p in d.iterdir() if p.is_file() and p.suffix in (".list", ".sources"))
        )
    return files


def _parse_one_line(path: Path) -> Iterator[SourceEntry]:
    text = path.read_text(encoding="utf-8", errors="replace")
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        # "deb [opt=a opt2=b] uri suite comp..." -- options may contain spaces
        # inside the brackets; drop them.
        if "[" in line:
            start = line.index("[")
            end = line.find("]", start)
            if end < 0:
                continue  # malformed; apt would reject the whole file
            line = line[:start] + " " + line[end + 1:]
        fields = line.split()
        if len(fields) < 3 or fields[0] not in ("deb", "deb-src"):
            continue
        yield SourceEntry(
            type=fields[0],
            uri=fields[1],
            suites=(fields[2],),
            components=tuple(fields[3:]),
            enabled=True,
            origin=path,
        )


def _parse_deb822(path: Path) -> Iterator[SourceEntry]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for para in Deb822.iter_paragraphs(f):
            types = para.get("Types", "").split()
            uris = para.get("URIs", "").split()
            suites = tuple(para.get("Suites", "").split())
            components = tuple(para.get("Components", "").split())
            enabled = para.get("Enabled", "yes").strip().lower() not in _FALSE_WORDS
            for t in types:
                for uri in uris:
                    yield SourceEntry(
                        type=t,
                        uri=uri,
                        suites=suites,
                        components=components,
                        enabled=enabled,
                        origin=path,
                    )


def iter_source_entries(sources_dir: Path = Path("/etc/apt")) -> Iterator[SourceEntry]:
    """All entries of the apt sources under *sources_dir*, in apt's order."""
    for path in _source_files(Path(sources_dir)):
        if path.suffix == ".sources":
            yield from _parse_deb822(path)
        else:
            yield from _parse_one_line(path)


def find_mirror(suite: str, sources_dir: Path = Path("/etc/apt")) -> str:
    """Base URI of the first enabled ``deb`` source carrying *suite* and ``main``.

    The suite must match exactly (``bookworm`` does not match ``bookworm-updates``
    nor ``stable``).  The URI is returned without a trailing slash.
    """
    sources_dir = Path(sources_dir)
    files = _source_files(sources_dir)
    skipped = []
    for entry in iter_source_entries(sources_dir):
        if entry.type != "deb" or not entry.enabled:
            continue
        if suite not in entry.suites or "main" not in entry.components:
            continue
        if not entry.uri.startswith(_SUPPORTED_SCHEMES):
            skipped.append(f"{entry.uri} ({entry.origin})")
            continue
        return entry.uri.rstrip("/")
    read = ", ".join(str(p) for p in files) or f"none found under {sources_dir}"
    extra = f"; skipped unsupported URI schemes: {', '.join(skipped)}" if skipped else ""
    raise BuildInputError(
        f"no enabled 'deb' source for suite {suite!r} with component 'main' "
        f"in the apt configuration (files read: {read}){extra}; "
        f"pass --mirror URL to name a Debian mirror"
    )
