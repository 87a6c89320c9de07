"""One self-contained HTML file from a matrix report (`dirtylog-matrix/1`).

Verdict table; per scenario the exact reproducer command, QEMU and artifact hashes; per trial the
migration timeline (remaining and transferred bytes, dirty page rate, dirty-bitmap pass
boundaries, max-bandwidth and downtime-limit changes) from its `timeline.jsonl` and a map of
guest-physical memory coloured by diagnosis. Plots are PNGs embedded as base64 data URIs: the
file needs nothing else to be read, offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from verifier.analysis.expect import summary_words
from verifier.fsutil import atomic_write

PAGE = 4096
MAP_COLUMNS = 256  # pages per row of the memory map: 1 MiB
DIAGNOSIS_COLOURS = {
    "identical": "#e6e6e6",
    "stale": "#d62728",
    "never-sent": "#ff7f0e",
    "torn": "#9467bd",
    "not-dirtyram": "#1f77b4",
    "impossible": "#000000",
}
# provenance classes (verifier.analysis.provenance): where in the pipeline the page was lost
PROVENANCE_COLOURS = {
    "identical": "#e6e6e6",
    "not-resent": "#d62728",
    "never-sent": "#ff7f0e",
    "lost-on-destination": "#1f77b4",
    "corrupt-in-stream": "#9467bd",
    "destination-diverged": "#000000",
    "no stream evidence": "#bcbd22",
}
OTHER_COLOUR = "#8c564b"
STATUS_COLOURS = {"pass": "#2ca02c", "fail": "#d62728", "error": "#ff7f0e", "interrupted": "#7f7f7f",
                  "not-run": "#7f7f7f", "expected-fail": "#9467bd", "unexpected-pass": "#d62728"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_timeline(path: Path) -> list[dict]:
    samples = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        samples.append(json.loads(line))
                    except ValueError:
                        continue  # a line cut short by an interruption
    except OSError:
        return []
    return samples


def timeline_plot(samples: list[dict], changes: list[dict], title: str = "") -> str | None:
    """PNG data URI: remaining/transferred MB vs time, dirty rate, pass boundaries, parameter changes."""
    pts = [s for s in samples if s.get("ram")]
    if not pts:
        return None
    plt = _plt()
    t = [s["t"] for s in pts]
    ram = [s["ram"] for s in pts]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax.plot(t, [r.get("remaining", 0) / 1e6 for r in ram], label="remaining (MB)", color="#d62728")
    ax.plot(t, [r.get("transferred", 0) / 1e6 for r in ram], label="transferred (MB)", color="#1f77b4")
    ax.set_ylabel("MB")
    ax2.plot(t, [r.get("dirty-pages-rate", 0) for r in ram], label="dirty pages rate (pages/s)", color="#9467bd")
    ax2.set_ylabel("dirty pages/s")
    ax2.set_xlabel("seconds since the migration started")
    last = None
    first_pass = True
    for s, r in zip(t, ram):
        sync = r.get("dirty-sync-count")
        if sync is not None and sync != last:
            if last is not None:
                for a in (ax, ax2):
                    a.axvline(s, color="#7f7f7f", linestyle=":", linewidth=1,
                              label="dirty sync (pass boundary)" if first_pass and a is ax else None)
                ax.annotate(f"sync {sync}", (s, 1), xycoords=("data", "axes fraction"), fontsize=7,
                            rotation=90, va="top", ha="right", color="#555555")
                first_pass = False
            last = sync
    labelled = set()
    for c in changes or []:
        for key, colour in (("downtime-limit", "#2ca02c"), ("max-bandwidth", "#ff7f0e"), ("postcopy", "#000000")):
            if key in c:
                text = {"downtime-limit": f"downtime {c[key]} ms",
                        "max-bandwidth": f"bw {c[key] / 1e6:.0f} MB/s" if isinstance(c[key], (int, float)) else f"bw {c[key]}",
                        "postcopy": "postcopy"}[key]
                for a in (ax, ax2):
                    a.axvline(c.get("t", 0), color=colour, linestyle="--", linewidth=1,
                              label=(key + " change") if key not in labelled and a is ax else None)
                labelled.add(key)
                ax2.annotate(text, (c.get("t", 0), 0.98), xycoords=("data", "axes fraction"), fontsize=7,
                             rotation=90, va="top", ha="left", color=colour)
    ax.legend(fontsize=7, loc="upper right")
    ax2.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return _png(fig)


def provenance_class(d: dict) -> str:
    """A range's provenance class (the class of most of its pages), for the map by provenance."""
    classes = (d.get("provenance") or {}).get("classes") or {}
    return max(classes, key=classes.get) if classes else "no stream evidence"


def memory_map(page_count: int, ram_base: int, differences: list[dict], title: str = "",
               by: str = "diagnosis") -> str | None:
    """PNG data URI: guest RAM as a grid (MAP_COLUMNS pages a row), differing ranges coloured by
    diagnosis (or, with by="provenance", by where the stream says each was lost) and ringed so
    that a single page stays visible."""
    if not page_count:
        return None
    if by == "provenance":
        differences = [dict(d, diagnosis=provenance_class(d)) for d in differences]
        palette = PROVENANCE_COLOURS
    else:
        palette = DIAGNOSIS_COLOURS
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    plt = _plt()
    kinds = ["identical"] + sorted({d.get("diagnosis", "?") for d in differences})
    code = {k: i for i, k in enumerate(kinds)}
    rows = -(-page_count // MAP_COLUMNS)
    grid = np.zeros(rows * MAP_COLUMNS, dtype=np.uint8)
    marks: dict[str, tuple[list, list]] = {}
    for d in differences:
        try:
            first = (int(d["start"], 16) - ram_base) // PAGE
            last = (int(d["end"], 16) - ram_base) // PAGE
        except (KeyError, TypeError, ValueError):
            continue
        first, last = max(first, 0), min(last, page_count - 1)
        if last < first:
            continue
        grid[first:last + 1] = code[d.get("diagnosis", "?")]
        xs, ys = marks.setdefault(d.get("diagnosis", "?"), ([], []))
        for p in range(first, last + 1, max(1, (last - first + 1) // 64)):
            xs.append(p % MAP_COLUMNS)
            ys.append(p // MAP_COLUMNS)
    if page_count < rows * MAP_COLUMNS:
        grid[page_count:] = 0
    colours = [palette.get(k, OTHER_COLOUR) for k in kinds]
    height = min(6.0, max(2.0, rows / 40))
    fig, ax = plt.subplots(figsize=(7.5, height))
    ax.imshow(grid.reshape(rows, MAP_COLUMNS), cmap=ListedColormap(colours), vmin=0, vmax=max(len(kinds) - 1, 1),
              interpolation="nearest", aspect="auto")
    for k, (xs, ys) in marks.items():
        ax.scatter(xs, ys, s=14, facecolors="none", edgecolors=palette.get(k, OTHER_COLOUR), linewidths=0.8)
    step = max(1, rows // 8)
    ticks = list(range(0, rows, step))
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{ram_base + r * MAP_COLUMNS * PAGE:#010x}" for r in ticks], fontsize=7)
    ax.set_xticks([0, 64, 128, 192, 255])
    ax.set_xticklabels(["+0", "+256K", "+512K", "+768K", "+1M"], fontsize=7)
    ax.set_xlabel(f"page within the 1 MiB row ({MAP_COLUMNS} pages of 4 KiB)", fontsize=8)
    counts = {}
    for d in differences:
        counts[d.get("diagnosis", "?")] = counts.get(d.get("diagnosis", "?"), 0) + int(d.get("pages") or 0)
    ax.legend(handles=[Patch(color=palette.get(k, OTHER_COLOUR),
                             label=k if k == "identical" else f"{k} ({counts.get(k, 0)} pages)") for k in kinds],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or f"guest-physical memory {ram_base:#x}-{ram_base + page_count * PAGE - 1:#x}", fontsize=9)
    return _png(fig)


# -- HTML -------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:1em} table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:3px 7px;
font-size:.9em;text-align:left;vertical-align:top} th{background:#f3f3f3}
.st{font-weight:bold;color:#fff;padding:1px 6px;border-radius:3px}
pre,code{background:#f6f6f6;font-size:.85em} pre{padding:.5em;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
img.plot{max-width:100%;border:1px solid #ddd;margin:.3em 0} .muted{color:#777}
td.ok{background:#e7f5e7} td.bad{background:#fbe3e3} td.na{color:#777}
"""


def _words(d) -> str:
    """A dict or list as words for people: 'key value, key value'; a scalar as itself."""
    if isinstance(d, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_words(v)}" for k, v in d.items() if v not in (None, "", [], {}))
    if isinstance(d, (list, tuple)):
        return " ".join(_words(v) for v in d)
    if isinstance(d, float):
        return f"{d:g}"
    return str(d)


def _kv_table(d: dict, unit: str = "") -> str:
    """One row per key: for parameters and timings."""
    rows = "".join(f"<tr><th>{_e(k.replace('_', ' '))}</th><td>{_e(_words(v))}{unit}</td></tr>"
                   for k, v in d.items() if v not in (None, "", [], {}))
    return f"<table>{rows}</table>"


def _checks_row(t: dict) -> str:
    """The trial's verdicts side by side: memory, CPU state, device state (when checked), liveness."""
    from verifier.reports.report import CHECK_LABELS, checks
    cells, head = [], []
    for name, c in checks(t).items():
        cls = {True: "ok", False: "bad"}.get(c["ok"], "na")
        cells.append(f'<td class="{cls}">{_e(c["text"])}</td>')
        head.append(f"<th>{_e(CHECK_LABELS[name])}</th>")
    head = "".join(head)
    return f'<table class="checks"><tr>{head}</tr><tr>{"".join(cells)}</tr></table>'


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _status(s: str) -> str:
    return f'<span class="st" style="background:{STATUS_COLOURS.get(s, "#7f7f7f")}">{_e(s.upper())}</span>'


def _anchor(name: str) -> str:
    return "s-" + "".join(c if c.isalnum() else "-" for c in name)


def render(matrix_report: dict, title: str = "dirtylog matrix report") -> str:
    r = matrix_report
    s = r.get("summary") or {}
    m = r.get("matrix") or {}
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
           f"<style>{CSS}</style></head><body>",
           f"<h1>{_e(title)}: {_status(r.get('verdict', '?'))}</h1>",
           "<table>",
           f"<tr><th>scenarios</th><td>{s.get('scenarios')} ({s.get('passed')} passed, {s.get('failed')} failed, "
           + summary_words(s)
           + f"{s.get('errors')} errors, {s.get('interrupted')} interrupted, {s.get('not_run')} not run)</td></tr>",
           f"<tr><th>trials</th><td>{_e(_words(s.get('trials')))}</td></tr>",
           f"<tr><th>matrix</th><td><code>{_e(m.get('file'))}</code> sha256 <code>{_e(m.get('sha256'))}</code></td></tr>",
           f"<tr><th>shard</th><td>{_e(r.get('shard') or 'all')}</td></tr>",
           f"<tr><th>command</th><td><code>{_e(r.get('command'))}</code></td></tr>",
           f"<tr><th>host</th><td>{_e(_words(r.get('host')))}</td></tr>",
           f"<tr><th>time</th><td>{_e(r.get('started'))} to {_e(r.get('finished'))}</td></tr>",
           f"<tr><th>exit code</th><td>{_e(r.get('exit_code'))}</td></tr>"]
    if r.get("merged_from"):
        out.append(f"<tr><th>merged from</th><td>{'<br>'.join(_e(x.get('dir')) for x in r['merged_from'])}</td></tr>")
    if r.get("missing"):
        out.append(f"<tr><th>missing scenarios</th><td>{_e(', '.join(r['missing']))}</td></tr>")
    out.append("</table><h2>Verdicts</h2><table><tr><th>#</th><th>scenario</th><th>verdict</th><th>trials</th>"
               "<th>differing pages</th><th>migration ms</th><th>downtime ms</th><th>dirty syncs</th>"
               "<th>wall s</th></tr>")
    scenarios = sorted(r.get("scenarios") or [], key=lambda x: x["index"])
    for sc in scenarios:
        rep = sc.get("report") or {}
        trials = rep.get("trials") or []
        diff = [str((t.get("compare") or {}).get("diff_count", "-")) for t in trials]
        mig = [str((t.get("migration") or {}).get("total_time_ms", "-")) for t in trials]
        down = [str((t.get("migration") or {}).get("downtime_ms", "-")) for t in trials]
        syncs = [str((t.get("migration") or {}).get("dirty_sync_count", "-")) for t in trials]
        verdicts = " ".join(t.get("verdict", "?") for t in trials) or "-"
        out.append(f"<tr><td>{sc['index']}</td><td><a href=\"#{_anchor(sc['name'])}\">{_e(sc['name'])}</a></td>"
                   f"<td>{_status(sc['status'])}</td><td>{_e(verdicts)}</td><td>{_e(' '.join(diff) or '-')}</td>"
                   f"<td>{_e(' '.join(mig) or '-')}</td><td>{_e(' '.join(down) or '-')}</td>"
                   f"<td>{_e(' '.join(syncs) or '-')}</td><td>{_e(sc.get('wall_s'))}</td></tr>")
    out.append("</table>")
    for sc in scenarios:
        out.append(_scenario_html(sc))
    out.append(f"<p class=\"muted\">schema {_e(r.get('schema'))}; generated by dirtylog</p></body></html>")
    return "\n".join(out) + "\n"


def _scenario_html(sc: dict) -> str:
    from verifier.reports.junit import trial_text
    rep = sc.get("report") or {}
    out = [f"<h2 id=\"{_anchor(sc['name'])}\">{_e(sc['name'])} {_status(sc['status'])}</h2>",
           f"<p>reproducer:</p><pre>{_e(rep.get('command') or sc.get('command'))}</pre>"]
    if sc.get("error"):
        out.append(f"<p><b>error:</b></p><pre>{_e(sc['error'])}</pre>")
    if sc.get("expectation"):
        out.append(f"<p><b>expectation:</b> {_e(sc['expectation'])}</p>")
    out.append("<table>")
    out.append(f"<tr><th>parameters</th><td>{_kv_table(sc.get('params') or {})}</td></tr>")
    if rep:
        q = rep.get("qemu") or {}
        out.append(f"<tr><th>QEMU</th><td>{_e(q.get('version'))} <code>{_e(q.get('path'))}</code></td></tr>")
        out.append(f"<tr><th>machine</th><td>{_e(rep.get('machine'))}, capture {_e(rep.get('capture'))}</td></tr>")
        for role, f in ((rep.get("artifacts") or {}).get("files") or {}).items():
            out.append(f"<tr><th>{_e(role)}</th><td><code>{_e(f.get('sha256'))}</code> {_e(f.get('path'))}</td></tr>")
        out.append(f"<tr><th>run directory</th><td><code>{_e(rep.get('run_dir'))}</code></td></tr>")
    out.append("</table>")
    for t in rep.get("trials") or []:
        out.append(f"<h3>trial {t['index']}: {_status(t.get('verdict', '?'))}</h3>")
        c = t.get("compare") or {}
        mg = t.get("migration") or {}
        if t.get("verdict") in ("pass", "fail"):
            out.append(_checks_row(t))
        if mg:
            timings = ", ".join(f"{k[:-2] if k.endswith('_s') else k} {v:g} s" for k, v in (t.get("timings") or {}).items()
                                if isinstance(v, (int, float)))
            out.append(f"<p>migration {_e(mg.get('total_time_ms'))} ms, downtime {_e(mg.get('downtime_ms'))} ms, "
                       f"{_e(mg.get('dirty_sync_count'))} dirty syncs, "
                       f"{(mg.get('transferred_bytes') or 0) / 1e6:.1f} MB sent"
                       + (f"; seconds: {_e(timings)}" if timings else "") + "</p>")
        if t.get("error"):
            out.append(f"<pre>error: {_e(t['error'])}</pre>")
        text = trial_text(t) if t.get("verdict") != "pass" else ""
        if text:
            out.append(f"<pre>{_e(text)}</pre>")
        tdir = Path(t.get("directory") or "")
        try:
            tl = timeline_plot(read_timeline(tdir / "timeline.jsonl"), t.get("parameter_changes") or [],
                               f"{sc['name']} trial {t['index']}: migration timeline")
        except Exception as exc:  # noqa: BLE001 - a plot must not lose the report
            tl, err = None, exc
        else:
            err = None
        if tl:
            out.append(f"<img class=\"plot timeline\" alt=\"migration timeline\" src=\"{tl}\">")
        else:
            out.append(f"<p class=\"muted\">no migration timeline ({_e(tdir / 'timeline.jsonl')}"
                       f"{': ' + _e(err) if err else ' has no samples'})</p>")
        if c.get("page_count") and not c.get("diff_count"):
            out.append(f"<p>memory map: all {_e(c['page_count'])} pages identical</p>")
        elif c.get("page_count"):
            try:
                mm = memory_map(int(c["page_count"]), int(str(c.get("ram_base", "0")), 0), t.get("differences") or [])
            except Exception:  # noqa: BLE001
                mm = None
            if mm:
                out.append(f"<img class=\"plot memmap\" alt=\"guest memory map\" src=\"{mm}\">")
            diffs = t.get("differences") or []
            if any(d.get("provenance") for d in diffs):
                try:
                    pm = memory_map(int(c["page_count"]), int(str(c.get("ram_base", "0")), 0), diffs,
                                    title="where each differing page was lost (the migration stream)", by="provenance")
                except Exception:  # noqa: BLE001
                    pm = None
                if pm:
                    out.append(f"<img class=\"plot memmap-provenance\" alt=\"guest memory map by provenance\" "
                               f"src=\"{pm}\">")
    return "\n".join(out)


def write(matrix_report: dict, path: Path) -> Path:
    return atomic_write(path, render(matrix_report))
