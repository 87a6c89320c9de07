"""`dirtylog stream FILE... [--json PATH]`: what recorded migration streams hold.

Each FILE is the raw bytes of one migration channel: the main channel (e.g. written by QEMU with
``migrate exec:cat > FILE`` or ``file:FILE``), one multifd channel connection, or the postcopy-preempt
channel (read with the main channel's page size and RAM blocks when the main channel is given too). Per file the
command prints the stream version, the machine type, the RAM blocks, the iterations with their
pages (full, zero, xbzrle; multifd and multifd-zero on multifd channels), the device sections and
whether a VMDESCRIPTION was present. Parsing is verifier.analysis.stream (files: stream_files); bad input (a missing
file, bytes that are not a migration stream, an unknown flag) raises its typed InputError, which
the CLI entry turns into one line and exit 2.

`register(cli)` adds the command to a click group.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

MAX_ITERATION_LINES = 12  # longer lists are shortened to the first and last ones (all are in --json)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 4)) == 0:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def _iteration_line(it: dict, kind: str) -> str:
    if kind == "main":
        return f"    {it['iteration']:>4}: {it['page']} full, {it['zero']} zero, {it['xbzrle']} xbzrle"
    if kind == "preempt":
        return f"    {it['iteration']:>4}: {it['page']} full, {it['zero']} zero"
    return f"    {it['iteration']:>4}: {it['multifd']} pages, {it['multifd-zero']} zero"


def render(summary) -> list[str]:
    """The text lines for one channel's summary."""
    s = summary
    lines = []
    name = s.path or s.channel
    if s.kind == "main":
        head = (f"{name}: main channel, QEMU migration stream version {s.stream_version}, "
                f"machine {s.machine or '?'}, page size {s.page_size}, {s.bytes} bytes, "
                + ("complete (QEMU_VM_EOF)" if s.complete else "incomplete"))
    elif s.kind == "preempt":
        head = (f"{name}: postcopy-preempt channel, page size {s.page_size}, {s.bytes} bytes, "
                + ("complete" if s.complete else "incomplete"))
    else:
        head = (f"{name}: multifd channel {s.multifd_id} ({s.channel}), packet version {s.stream_version}, "
                f"page size {s.page_size}, {s.bytes} bytes, {s.packets} packets ({s.sync_packets} SYNC)")
    lines.append(head)
    r = s.records
    if s.kind == "main":
        lines.append(f"  records: {r.get('page', 0)} full pages, {r.get('zero', 0)} zero pages, "
                     f"{r.get('xbzrle', 0)} xbzrle pages, {r.get('eos', 0)} EOS, "
                     f"{r.get('multifd_flush', 0)} MULTIFD_FLUSH in {s.ram_sections} RAM sections")
        if s.capabilities:
            lines.append(f"  capabilities (configuration): {', '.join(s.capabilities)}")
        if s.ram_blocks:
            blocks = ", ".join(f"{b['name']} {_size(b['size'])}" for b in s.ram_blocks)
            lines.append(f"  RAM blocks: {blocks}")
    elif s.kind == "preempt":
        lines.append(f"  records: {r.get('page', 0)} full pages, {r.get('zero', 0)} zero pages, "
                     f"{r.get('eos', 0)} EOS")
        if s.ram_blocks:
            lines.append(f"  RAM blocks: {', '.join(b['name'] for b in s.ram_blocks)}")
    else:
        lines.append(f"  records: {r.get('multifd', 0)} pages, {r.get('multifd-zero', 0)} zero pages")
    its = s.iterations
    lines.append(f"  iterations: {len(its)}")
    shown = its if len(its) <= MAX_ITERATION_LINES else its[:MAX_ITERATION_LINES // 2] + [None] + \
        its[-(MAX_ITERATION_LINES // 2):]
    for it in shown:
        lines.append(f"    ... {len(its) - MAX_ITERATION_LINES} more ..." if it is None else _iteration_line(it, s.kind))
    if s.kind == "main":
        devs = s.device_sections
        if devs:
            lines.append(f"  device sections: {len(devs)}")
            for d in devs:
                lines.append(f"    {d['section_id']:>4} {d['type']:<5} {d['name']} instance {d['instance']} "
                             f"version {d['version']}, {d['size']} bytes")
        else:
            lines.append("  device sections: none")
        if s.commands:
            lines.append("  commands: " + ", ".join(f"{k} x{v}" for k, v in s.commands.items()))
        if s.vmdescription:
            n = len((s.vmdesc or {}).get("devices", []))
            lines.append(f"  VMDESCRIPTION: present ({n} devices; {s.vmdesc_checked} section sizes match)")
        else:
            lines.append("  VMDESCRIPTION: absent")
        if s.features:
            lines.append(f"  features seen: {', '.join(s.features)}")
    return lines


def register(cli_group: click.Group) -> None:
    """Add `stream` to the given click group."""

    @cli_group.command("stream")
    @click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
    @click.option("--json", "json_path", type=click.Path(path_type=Path),
                  help="Also write every channel's summary (with the VMDESCRIPTION JSON) to this file.")
    def stream_cmd(files, json_path):
        """Print what recorded migration streams hold: per FILE (one channel's raw bytes: the main
        channel, a multifd channel or the postcopy-preempt channel) the stream version, iterations
        with pages per iteration,
        bytes, RAM blocks, device sections and whether a VMDESCRIPTION was present."""
        from verifier.analysis.stream_files import parse_files
        summaries = parse_files(files)
        out = []
        for s in summaries:
            out.extend(render(s))
        click.echo("\n".join(out))
        if json_path:
            json_path.write_text(json.dumps({"schema": "dirtylog-stream/1",
                                             "channels": [s.to_dict() for s in summaries]}, indent=2) + "\n")
