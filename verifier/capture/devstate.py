"""Device state compared section by section, field by field.

After capture both VMs are stopped: the source in postmigrate, the destination paused before it
runs. Each saves its device state to a file of its own with QMP ``xen-save-devices-state``
(``live: false``): QEMU's non-live save of every non-RAM section (savevm.c
qemu_save_device_state: the file header, each device section with its footer, QEMU_VM_EOF; the
same vmstate_save() a migration's final device sections are written by). Neither VM changes run
state by it. A full ``migrate`` to a file would not do: QEMU refuses to migrate a source that a
migration paused ("Can't migrate the vm that was paused due to previous migration"), and it
would leave the destination in postmigrate before it ever ran.

Such a file has no VMDESCRIPTION (the JSON that names every field and its size). The migration
stream has one, at its end, and the tap keeps it with the stream's device section bodies; where
the stream has none (QEMU does not send it in postcopy; --no-stream), `describe` gets one from a
fresh, paused QEMU of the same machine saved to a file. With it, every section body of every copy is split into
named fields: `section/field[index]`, a struct's fields as `struct.field`, a subsection's fields
under the subsection's name (`cpu/cpu/vfp/fpscr`: section cpu, subsection cpu/vfp); the instance
of a section other than 0 is written `name@instance`, the second field of a name a vmstate uses
twice (`unused`) `name#2`. A body the description does not fit (another
QEMU wrote it, or a subsection the source did not send) is compared as bytes and says so.

Three copies are compared when there are three: the source's re-saved state with the
destination's (did the device state arrive?), the stream's (what the destination received) with
the destination's re-saved state (did the destination load what it received?), and the stream's
with the source's (did the source's state change after it was sent?). Differences on fields of
`devstate_allowlist.json` ({fnmatch pattern on the field path: reason}) are listed as allowed,
with their reason, never dropped.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from verifier.errors import InputError, VerifyError

ALLOWLIST_PATH = Path(__file__).with_name("devstate_allowlist.json")
SUBSECTION = 0x05
MAX_DIFFERENCES = 200
# value types that are numbers: shown as one hex number (big-endian as QEMU writes them, except
# 'int32 le', written little-endian)
_LITTLE_ENDIAN = {"int32 le"}
_BYTES_TYPES = {"buffer", "unused_buffer", "pci config", "pci irq state"}


class DeviceStateError(VerifyError):
    """QEMU could not save its device state (QMP refused, or the file is unreadable)."""

    exit_code = 3


class LayoutError(InputError):
    """A section body that its VMDESCRIPTION entry does not describe."""


@dataclass(frozen=True, slots=True)
class Field:
    path: str
    type: str
    value: bytes


def save_as(proc, filename: str) -> None:
    """Ask a stopped QEMU (a QemuProcess, local or remote) to save its device state to `filename`
    (relative: in the QEMU's working directory)."""
    try:
        proc.qmp("xen-save-devices-state", filename=filename, live=False)
    except VerifyError as exc:
        raise DeviceStateError(f"the {proc.name} QEMU could not save its device state: {exc}") from None


def save(proc, path: Path) -> Path:
    """Save the device state of a stopped QEMU on this machine to `path`; the path returned."""
    save_as(proc, str(path))
    if not path.is_file():
        raise DeviceStateError(f"the {proc.name} QEMU saved its device state, but {path} is not there")
    return path


def describe(qemu, args: list[str], directory: Path, page_size: int, timeout_s: float = 120.0) -> dict:
    """A VMDESCRIPTION when the stream has none (postcopy, --no-stream): a QEMU of the same command
    line (`args`, without the RAM backing file of a capture), paused from the start (-S), saved to a
    file (`exec:cat`); its description, the file deleted. Subsections a running guest needs and a
    fresh machine does not (or the reverse) make that section's description not fit: it is then
    compared as bytes, and says so."""
    import shlex
    import time

    from verifier.run.qemu import QemuProcess
    out = directory / "devstate-description.bin"
    try:
        with QemuProcess(qemu, [*args, "-S"], directory, "desc") as q:
            q.qmp("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
            q.qmp("migrate", uri=f"exec:cat > {shlex.quote(str(out.resolve()))}")
            deadline = time.monotonic() + timeout_s
            while (st := q.qmp("query-migrate")).get("status") != "completed":
                if st.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise DeviceStateError(f"the QEMU describing the device sections did not save its state: "
                                           f"{st.get('error-desc') or st.get('status')}")
                time.sleep(0.05)
        _, vmdesc = read_file(out, page_size)
    finally:
        out.unlink(missing_ok=True)
    if vmdesc is None:
        raise DeviceStateError("the QEMU describing the device sections saved no VMDESCRIPTION")
    return vmdesc


def read_sections(path: Path) -> list[tuple[dict, bytes]]:
    """The device sections of a device-state file (or of any main-channel stream): ({name,
    instance, version, ...}, body) in file order."""
    return read_file(path)[0]


def read_file(path: Path, page_size: int = 4096) -> tuple[list[tuple[dict, bytes]], dict | None]:
    """The device sections of a device-state file or a recorded main channel, and its VMDESCRIPTION
    (None when it has none: a device-state file, a postcopy stream). `page_size`: the target page
    size when the stream's configuration does not give it (verifier.analysis.stream)."""
    from verifier.analysis.stream import StreamParser
    from verifier.analysis.stream_files import read_into
    parser = StreamParser(device_bodies=True, page_size=page_size)
    try:
        read_into(parser, Path(path))
        summary = parser.close()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    return list(parser.device_bodies), summary.vmdesc


def section_label(name: str, instance: int) -> str:
    return name if not instance else f"{name}@{instance}"


def decode(body: bytes, desc: dict, label: str) -> list[Field]:
    """The fields of one section body by its VMDESCRIPTION entry; LayoutError if it does not fit."""
    out: list[Field] = []
    pos = _walk(body, 0, desc, label + "/", out)
    if pos != len(body):
        raise LayoutError(f"{label}: the description covers {pos} of the body's {len(body)} bytes")
    seen: dict[str, int] = {}
    for i, f in enumerate(out):  # a name a vmstate uses twice ("unused"): the second is name#2
        n = seen[f.path] = seen.get(f.path, 0) + 1
        if n > 1:
            out[i] = Field(f"{f.path}#{n}", f.type, f.value)
    return out


def _walk(body: bytes, pos: int, obj: dict, prefix: str, out: list) -> int:
    for f in obj.get("fields", ()):
        name = f["name"] + (f"[{f['index']}]" if "index" in f else "")
        count = f.get("array_len")
        size = int(f.get("size", 0))
        for i in range(count or 1):
            path = prefix + name + (f"[{i}]" if count else "")
            if f.get("type") == "struct" and "struct" in f:
                pos = _walk(body, pos, f["struct"], path + ".", out)
                continue
            if pos + size > len(body):
                raise LayoutError(f"{path}: {size} bytes at offset {pos} run past the body's {len(body)}")
            out.append(Field(path, f.get("type", "?"), body[pos:pos + size]))
            pos += size
    for sub in obj.get("subsections", ()):
        name = sub.get("vmsd_name", "")
        raw = name.encode()
        head = bytes([SUBSECTION, len(raw)]) + raw
        if body[pos:pos + len(head)] != head:
            raise LayoutError(f"{prefix}{name}: the description has this subsection at offset {pos}, "
                              f"the body does not")
        pos += len(head) + 4  # be32 version
        pos = _walk(body, pos, sub, prefix + name + "/", out)
    return pos


def show(f: Field | None) -> str:
    """A field's value for people: a number as hex, a buffer as hex bytes (abridged)."""
    if f is None:
        return "absent"
    v = f.value
    if f.type not in _BYTES_TYPES and len(v) in (1, 2, 4, 8):
        return hex(int.from_bytes(v, "little" if f.type in _LITTLE_ENDIAN else "big"))
    text = v.rstrip(b"\0")
    if text and all(0x20 <= c < 0x7F for c in text) and not any(v[len(text):]):
        return repr(text.decode())  # a NUL-padded string (globalstate/runstate)
    return v.hex() if len(v) <= 16 else f"{v[:16].hex()}... ({len(v)} bytes)"


def load_allowlist(path: Path = ALLOWLIST_PATH) -> dict:
    """{fnmatch pattern on the field path: reason, or {"bytes": [first, end], "reason": ...} for a
    buffer field of which only those bytes may differ}."""
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def _allowed(path: str, allow: dict, a: bytes = b"", b: bytes = b"") -> str | None:
    for pattern, rule in allow.items():
        if not (path == pattern or fnmatch.fnmatchcase(path, pattern)):
            continue
        if isinstance(rule, str):
            return rule
        first, end = rule["bytes"]
        if len(a) == len(b) and all(first <= i < end for i, (x, y) in enumerate(zip(a, b)) if x != y):
            return f"{rule['reason']} (only bytes {first}-{end - 1} differ)"
    return None


# The ARM generic timers' CTL registers in the cpu section's cpreg list (their KVM ids, the same
# on 7.2 and 10.0): ISTATUS (bit 2) is not state but the timer condition, recomputed from the
# counter and CVAL when the state is loaded (target/arm/helper.c gt_recalc_timer), so a copy saved
# before the timer's deadline and one loaded after it differ in that bit alone.
GT_CTL_IDS = {0x603000000013DF11: "CNTP_CTL", 0x603000000013DF19: "CNTV_CTL"}
ISTATUS = 0x4


def _cpreg_rule(x: Field, y: Field, fields: dict[str, Field]) -> str | None:
    """The reason a difference in cpu/cpreg_vmstate_values[i] is allowed, or None."""
    head, _, index = x.path.rpartition("cpreg_vmstate_values")
    idx = fields.get(f"{head}cpreg_vmstate_indexes{index}")
    if idx is None:
        return None
    name = GT_CTL_IDS.get(int.from_bytes(idx.value, "big"))
    if name and int.from_bytes(x.value, "big") ^ int.from_bytes(y.value, "big") == ISTATUS:
        return (f"{name}.ISTATUS, the timer condition: recomputed from the counter and CVAL on load "
                f"(gt_recalc_timer), not migrated state")
    return None


def _by_key(sections) -> dict[tuple[str, int], bytes]:
    return {(s["name"], s["instance"]): body for s, body in sections}


def _descriptions(vmdesc: dict | None) -> dict[tuple[str, int], dict]:
    if not vmdesc:
        return {}
    return {(d.get("name"), d.get("instance_id")): d for d in vmdesc.get("devices", ())}


def compare_pair(a_sections, b_sections, vmdesc: dict | None, names: tuple[str, str],
                 allowlist: dict[str, str] | None = None) -> dict:
    """Compare two copies of the device state. `names` say which copies ('source', 'destination',
    'stream'). Each difference: {"field", "section", names[0], names[1], "type"}, plus "offset" for
    a section compared as bytes."""
    allow = load_allowlist() if allowlist is None else allowlist
    a, b = _by_key(a_sections), _by_key(b_sections)
    descs = _descriptions(vmdesc)
    left, right = names
    diffs: list[dict] = []
    allowed: list[dict] = []
    as_bytes: list[str] = []
    fields = 0
    for key in list(a) + [k for k in b if k not in a]:
        label = section_label(*key)
        if key not in a or key not in b:
            diffs.append({"section": label, "field": label, "type": "section",
                          left: "present" if key in a else "absent", right: "present" if key in b else "absent"})
            continue
        ba, bb = a[key], b[key]
        desc = descs.get(key)
        fa = fb = None
        if desc is not None:
            try:
                fa, fb = decode(ba, desc, label), decode(bb, desc, label)
            except LayoutError as exc:
                as_bytes.append(f"{label}: {exc}")
                fa = fb = None
        if fa is None:
            fields += 1
            if ba != bb:
                at = next((i for i, (x, y) in enumerate(zip(ba, bb)) if x != y), min(len(ba), len(bb)))
                entry = {"section": label, "field": f"{label} (bytes)", "type": "bytes", "offset": at,
                         left: f"{len(ba)} bytes, {ba[at:at + 8].hex() or 'end'} at {at}",
                         right: f"{len(bb)} bytes, {bb[at:at + 8].hex() or 'end'} at {at}"}
                # Without field boundaries a section holding an allowlisted field (pl031's clock-derived
                # tick_offset_vmstate) cannot be told apart from a real difference: allowed, saying why.
                known = [f"{p}: {r}" for p, r in allow.items() if fnmatch.fnmatchcase(label, p.split("/")[0])]
                if known and len(ba) == len(bb):
                    allowed.append({**entry, "reason": "compared as bytes (no description fits), and the section "
                                                       "has allowlisted fields: " + "; ".join(known)})
                else:
                    diffs.append(entry)
            continue
        fields += len(fa)
        by_path = {f.path: f for f in fa}
        for x, y in zip(fa, fb):
            if x.value == y.value:
                continue
            entry = {"section": label, "field": x.path, "type": x.type, left: show(x), right: show(y)}
            reason = _allowed(x.path, allow, x.value, y.value) or (
                _cpreg_rule(x, y, by_path) if "cpreg_vmstate_values[" in x.path else None)
            (allowed if reason else diffs).append({**entry, "reason": reason} if reason else entry)
    return {"identical": not diffs, "differences": diffs[:MAX_DIFFERENCES],
            "differences_not_listed": max(0, len(diffs) - MAX_DIFFERENCES), "allowed": allowed,
            "sections": len(set(a) | set(b)), "fields_compared": fields, "compared_as_bytes": as_bytes,
            "copies": [left, right]}


def compare(copies: dict[str, list], vmdesc: dict | None, allowlist: dict[str, str] | None = None) -> dict:
    """`copies`: {"source": sections, "destination": sections, "stream": sections (optional)}.

    The result: {"identical", "pairs": {"source/destination": compare_pair(), ...}, "described"}.
    The pairs, in order: source with destination, stream with destination, stream with source."""
    pairs = {}
    for left, right in (("source", "destination"), ("stream", "destination"), ("stream", "source")):
        if left in copies and right in copies:
            pairs[f"{left}/{right}"] = compare_pair(copies[left], copies[right], vmdesc, (left, right), allowlist)
    return {"identical": all(p["identical"] for p in pairs.values()), "pairs": pairs,
            "described": vmdesc is not None}


def format_differences(result: dict, limit: int = 20) -> list[str]:
    """One line per difference: 'source/destination pl011/int_level: source 0x0, destination 0x10'."""
    lines = []
    for pair, r in result.get("pairs", {}).items():
        left, right = r["copies"]
        for d in r["differences"][:limit]:
            lines.append(f"{pair} {d['field']}: {left} {d[left]}, {right} {d[right]}")
        extra = len(r["differences"]) - limit + r.get("differences_not_listed", 0)
        if extra > 0:
            lines.append(f"{pair}: ... and {extra} more in report.json")
    return lines
