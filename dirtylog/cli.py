"""`dirtylog`: build guest artifacts, verify dirty page logging across a live migration, compare.

Exit codes (dirtylog/console.py): 0 pass, 1 verification found differences, 2 usage or input error,
3 infrastructure failure (QEMU crashed, migration failed, download failed), 4 internal error,
130 interrupted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dirtylog.cli_matrix import register as _register_matrix_commands
from dirtylog.cli_stream import register as _register_stream_command

from dirtylog.console import EXIT_DIFFERENCES, EXIT_INFRA, EXIT_PASS, Console, fail as _fail, run_main, version

class TableValue(click.ParamType):
    """A verify option's value, parsed by its kind in verifier.run.options (the one option table)."""

    def __init__(self, option):
        self.option = option
        self.name = option.metavar or option.kind.metavar

    def convert(self, value, param, ctx):
        from verifier.errors import InputError
        if not isinstance(value, str):
            return value
        try:
            return self.option.kind.parse(value, self.option.flag)
        except InputError as exc:
            self.fail(str(exc).removeprefix(f"{self.option.flag} "), param, ctx)


def table_option(o):
    """The click option of one entry of verifier.run.options.OPTIONS."""
    kw = {"help": o.help, "show_default": o.show_default}
    if o.kind.is_flag:
        kw["is_flag"] = True
        kw["default"] = False
    else:
        kw["default"] = None if o.multiple or o.default in ((), {}) else o.default
        kw["multiple"] = o.multiple
        if o.kind.choices is not None:
            kw["type"] = click.Choice(o.kind.choices)
        elif o.kind.path:
            kw["type"] = click.Path(path_type=Path)
        else:
            kw["type"] = TableValue(o)
        if o.metavar:
            kw["metavar"] = o.metavar
    return click.option(o.flag, o.name, **kw)


def _print_version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(f"dirtylog {version()}")
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True,
              help="Show QEMU command lines and QMP traffic (always kept in the run directory's qmp-*.log).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show dirtylog's version (from a checkout, with its git commit) and exit.")
@click.pass_context
def cli(ctx, verbose, quiet):
    """Verify that after a live migration the destination's guest RAM is exactly the source's."""
    ctx.obj = Console(quiet=quiet, verbose=verbose)


# -- build ----------------------------------------------------------------------------------------
def build_options(f):
    f = click.option("--out", "out", type=click.Path(path_type=Path), default=Path("artifacts"),
                     show_default=True, help="Directory for the artifacts and manifest.json.")(f)
    f = click.option("--offline", is_flag=True, help="Use only the download cache; say what is missing.")(f)
    f = click.option("--mirror", metavar="URL",
                     help="Debian mirror (default: the one in this machine's apt sources).")(f)
    f = click.option("--cache-dir", type=click.Path(path_type=Path),
                     help="Download cache (default: $DIRTYLOG_CACHE or ~/.cache/dirtylog).")(f)
    f = click.option("--runtime", type=click.Choice(["auto", "host", "docker", "podman"]), default="auto",
                     show_default=True,
                     help="Where to build: a container (docker; podman through its Docker API socket) or this "
                          "host; auto: a container when an engine answers, this host otherwise.")(f)
    f = click.option("--qemu-version", type=click.Choice(["10.0", "7.2"]), default="10.0", show_default=True,
                     help="Which Debian QEMU source package the patched QEMU (-savedirtylog) is built from.")(f)
    f = click.option("--qemu-bug", metavar="NAME",
                     help="With the patched QEMU: build it with one defect of the bug zoo "
                          "(builder/patches/bugzoo-10.0/NAME.patch; benchmarks/bugzoo.py runs them all), "
                          "incrementally on this host from the patched build's kept tree; the manifest names it.")(f)
    f = click.option("--engine", type=click.Choice(["debian", "buildroot"]), default="debian", show_default=True,
                     help="debian: Debian's pinned kernel and busybox; buildroot: everything from source "
                          "through buildroot-external/ (Buildroot's pinned release, or --buildroot-dir).")(f)
    f = click.option("--buildroot-dir", type=click.Path(path_type=Path),
                     help="A Buildroot tree (LTS 2026.02.x); default: the pinned release 2026.02.3, downloaded "
                          "once with its sha256 checked and kept in the download cache.")(f)
    f = click.option("--buildroot-url", metavar="URL",
                     help="Where the pinned Buildroot release tarball is downloaded from (a directory URL; "
                          "default: https://buildroot.org/downloads/).")(f)
    f = click.option("--dl-dir", type=click.Path(path_type=Path),
                     help="Buildroot download cache; with --offline every missing archive is named first.")(f)
    f = click.option("--toolchain", type=click.Choice(["buildroot", "host"]), default="buildroot",
                     show_default=True, help="Buildroot engine: its own toolchain, or Debian's cross-compiler.")(f)
    f = click.option("--br2-fragment", "br2_fragments", multiple=True, type=click.Path(path_type=Path),
                     help="Buildroot engine: a file of BR2_* lines appended to the defconfig (repeatable), e.g. "
                          "BR2_PACKAGE_OVERRIDE_FILE or a local kernel tarball for builds without network.")(f)
    f = click.option("--arch", type=click.Choice(["armv7", "aarch64", "x86_64"]), default="armv7",
                     show_default=True,
                     help="Guest architecture: armv7 (vexpress-a15/virt), aarch64 (virt), x86_64 (q35).")(f)
    return f


def _build(console, out, offline, mirror, cache_dir, arch, runtime, engine="debian", buildroot_dir=None,
           dl_dir=None, toolchain="buildroot", br2_fragments=(), buildroot_url=None):
    from builder.runtime import get_runtime
    if engine == "buildroot":
        from builder.buildroot import ARCH_DEFCONFIGS
        if arch not in ARCH_DEFCONFIGS:
            raise click.BadParameter(f"the buildroot engine builds {', '.join(ARCH_DEFCONFIGS)}", param_hint="--arch")
        if buildroot_dir and buildroot_url:
            raise click.UsageError("--buildroot-url and --buildroot-dir exclude each other")
        rt = get_runtime(runtime, log=console.detail, warn=console.step)
        console.step(f"building {arch} guest artifacts from source with Buildroot into {out} (runtime: {rt.name})")
        manifest = rt.build_buildroot(out, ARCH_DEFCONFIGS[arch], buildroot_dir=buildroot_dir,
                                      buildroot_url=buildroot_url, dl_dir=dl_dir, offline=offline,
                                      toolchain=toolchain, fragments=br2_fragments, cache_dir=cache_dir,
                                      log=console.step)
        for entry in manifest.get("files", []):
            console.step(f"  {entry['name']}  {entry['sha256']}")
        return manifest
    if buildroot_dir or dl_dir or br2_fragments or buildroot_url:
        raise click.UsageError("--buildroot-dir, --buildroot-url, --dl-dir and --br2-fragment go with "
                               "--engine buildroot")
    rt = get_runtime(runtime, log=console.detail, warn=console.step)
    console.step(f"building {arch} guest artifacts into {out} (runtime: {rt.name})")
    manifest = rt.build(out, arch=arch, offline=offline, mirror=mirror, cache_dir=cache_dir, log=console.step)
    for entry in manifest["files"]:
        console.step(f"  {entry['name']}  {entry['sha256']}")
    return manifest


def _build_patched_qemu(console, out, version, mirror, cache_dir, offline, runtime="host", bug=None) -> str:
    """Build (or reuse) QEMU with -savedirtylog (and `bug`, a bug-zoo defect) and record it in the
    artifacts' manifest."""
    from builder.cache import Cache
    from builder.qemu_build import build_patched_qemu, build_zoo_qemu, zoo_header
    from builder.runtime import get_runtime
    console.step(f"building (or reusing) QEMU {version} with -savedirtylog" + (f" and bug-zoo defect {bug}" if bug else ""))
    if bug:  # on this host: the incremental build needs the host's own kept tree
        zoo_header(version, bug)  # an unknown name is exit 2 before anything is built
        qb = build_zoo_qemu(version, bug, Cache(cache_dir), mirror=mirror, offline=offline, log=console.step,
                            progress=sys.stderr.isatty())
    else:
        rt = get_runtime(runtime, log=console.detail, warn=console.step)
        if hasattr(rt, "build_qemu"):  # a container builds it into the shared cache; the host reuses it
            rt.build_qemu(version, cache_dir=cache_dir, mirror=mirror, offline=offline, log=console.step)
        qb = build_patched_qemu(version, Cache(cache_dir), mirror=mirror, offline=offline, log=console.step,
                                progress=sys.stderr.isatty())
    from builder.manifest import amend_manifest
    entry = {"path": str(qb.qemu_system_arm), "version": qb.version, "patched": True,
             "source_package": qb.source_package, "source_version": qb.source_version,
             "patches": list(qb.patches), "cache_key": qb.cache_key}
    if bug:
        entry["bug"] = bug
    amend_manifest(out, {"qemu": entry}, what="--qemu patched")
    console.step(f"  {qb.qemu_system_arm} ({qb.version_text}{', cached' if qb.cache_hit else ''})")
    return str(qb.qemu_system_arm)


@cli.command()
@build_options
@click.option("--qemu", "qemu_kind", type=click.Choice(["stock", "patched"]), default="stock", show_default=True,
              help="patched: also build (or reuse) QEMU with -savedirtylog from Debian's source package, "
                   "recorded in the manifest so that verify uses it.")
@click.pass_obj
def build(console, out, offline, mirror, cache_dir, arch, runtime, engine, buildroot_dir, buildroot_url, dl_dir,
          toolchain, br2_fragments, qemu_version, qemu_bug, qemu_kind):
    """Build the guest artifacts and manifest.json.

    armv7: zImage, guest_a15x2.dtb, initrd.cpio-dirtyram.gz, dirtyram.arm; aarch64: Image,
    initrd.cpio-dirtyram.gz, dirtyram.aarch64; x86_64: bzImage, initrd.cpio-dirtyram.gz,
    dirtyram.x86_64.
    """
    if qemu_bug and qemu_kind != "patched":
        raise click.UsageError("--qemu-bug builds a defect into the patched QEMU: it needs --qemu patched")
    _build(console, out, offline, mirror, cache_dir, arch, runtime, engine, buildroot_dir, dl_dir, toolchain,
           br2_fragments, buildroot_url)
    if qemu_kind == "patched":
        _build_patched_qemu(console, out, qemu_version, mirror, cache_dir, offline, runtime, qemu_bug)
    click.echo(str(out / "manifest.json"))


@cli.command("lock")
@click.option("--refresh", is_flag=True, required=True,
              help="Rewrite the lock file with the archive's current versions and hashes.")
@click.option("--mirror", metavar="URL", help="Debian mirror (default: from apt sources).")
@click.pass_obj
def lock_cmd(console, refresh, mirror):
    """Refresh the pinned Debian packages of every architecture (builder/locks/*.json)."""
    from builder.lock import refresh_all_locks
    for change in refresh_all_locks(mirror, log=console.step):
        click.echo(change.describe())


# -- verify ---------------------------------------------------------------------------------------
def verify_options(f):
    """The verify options (verifier.run.options.OPTIONS, in the table's order), then the guest files
    and the JSON report, which belong to the command rather than to the plan."""
    from verifier.run.options import OPTIONS
    opts = [table_option(o) for o in OPTIONS if o.flag]
    opts[-2:-2] = [
        click.option("--kernel", type=click.Path(path_type=Path), help="Use this zImage (bring your own guest)."),
        click.option("--dtb", type=click.Path(path_type=Path), help="Use this device tree."),
        click.option("--initrd", type=click.Path(path_type=Path),
                     help="Use this initrd (gzip or plain cpio). A foreign one is ready at its shell prompt."),
        click.option("--json", "json_path", type=click.Path(path_type=Path),
                     help="Also write the JSON report here."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _verify(console, artifacts, **kw):
    from verifier.artifacts import foreign_artifacts, load_artifacts
    from verifier.run.options import from_cli
    from verifier.run.verify import verify
    if kw["kernel"] or kw["dtb"] or kw["initrd"]:
        base = load_artifacts(artifacts) if (artifacts / "manifest.json").is_file() else None
        art = foreign_artifacts(kw["kernel"], kw["dtb"], kw["initrd"], kw["machine"] or "vexpress-a15", base)
    else:
        art = load_artifacts(artifacts)
    remote = any(kw[h] not in (None, "local") for h in ("src_host", "dst_host"))
    if kw["qemu"] is None and art.manifest.get("qemu", {}).get("path") and not remote:
        kw["qemu"] = art.manifest["qemu"]["path"]  # the QEMU built with the artifacts
        console.step(f"QEMU from the manifest: {kw['qemu']}")
    for note in art.notes:
        console.step(f"note: {note}")
    opts = from_cli(kw)
    if "max-bandwidth" in opts.parameters or "downtime-limit" in opts.parameters:
        raise click.BadParameter("max-bandwidth and downtime-limit are driven by dirtylog: use "
                                 "--max-bandwidth and --min-passes", param_hint="--parameter")
    if kw["json_path"] is not None and not kw["json_path"].parent.is_dir():
        raise click.BadParameter(f"directory of {kw['json_path']} does not exist", param_hint="--json")
    try:
        report = verify(art, opts, reporter=console)
    except KeyboardInterrupt as exc:
        partial = getattr(exc, "report", None)
        if partial is not None:
            partial.write(kw["json_path"])  # the trials done so far, verdict "interrupted"
        raise
    report.write(kw["json_path"])
    text = report.render_text()
    click.echo(text.splitlines()[0] if console.quiet else text, nl=True)
    failed = next((t for t in report.trials if t.error), None)
    if failed is not None:
        _fail(failed.error, failed.error_exit_code or EXIT_INFRA)
    sys.exit(report.exit_code)


@cli.command("verify")
@click.option("--artifacts", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True,
              help="Directory made by `dirtylog build` (with manifest.json).")
@click.option("--matrix", "matrix_file", type=click.Path(path_type=Path),
              help="Run every scenario of this TOML matrix (a file, or the name of one shipped with "
                   "dirtylog, e.g. smoke; docs/report-schema.md) instead of one verification; scenario options "
                   "then come from the file.")
@click.option("--jobs", type=click.IntRange(1, 256), default=1, show_default=True,
              help="With --matrix: scenarios run at once (fewer if the host's cores or memory cannot hold them).")
@click.option("--shard", metavar="I/N", help="With --matrix: run only shard I of N (deterministic, cost-balanced); "
              "combine shards with `dirtylog report merge`.")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path), help="With --matrix: also write JUnit XML here.")
@click.option("--html", "html_path", type=click.Path(path_type=Path), help="With --matrix: also write the HTML report here.")
@click.option("--scenario", "select", multiple=True, metavar="GLOB",
              help="With --matrix: run only the scenarios whose name matches (repeatable; * and ? are wildcards, e.g. 'release[*smp=2*]').")
@verify_options
@click.pass_context
def verify_cmd(ctx, artifacts, matrix_file, jobs, shard, junit_path, html_path, select, **kw):
    """Boot source and destination, live-migrate under load, capture and compare guest RAM."""
    console = ctx.obj
    if matrix_file is None:
        for opt, given in (("--jobs", jobs != 1), ("--shard", shard), ("--junit", junit_path), ("--html", html_path),
                           ("--scenario", select)):
            if given:
                raise click.UsageError(f"{opt} applies to --matrix runs only")
        _verify(console, artifacts, **kw)
        return
    from click.core import ParameterSource
    clash = [p.opts[0] for p in ctx.command.params if p.name in kw and p.name not in ("run_dir", "json_path")
             and ctx.get_parameter_source(p.name) is not ParameterSource.DEFAULT]
    if clash:
        raise click.UsageError(f"{', '.join(clash)}: with --matrix the scenario options come from the matrix file")
    from dirtylog.cli_matrix import run_matrix
    sys.exit(run_matrix(matrix_file, jobs, shard, artifacts, kw["run_dir"], kw["json_path"], junit_path,
                        html_path, console, select))


@cli.command("make-and-verify")
@build_options
@verify_options
@click.pass_obj
def make_and_verify(console, out, offline, mirror, cache_dir, arch, runtime, engine, buildroot_dir, buildroot_url,
                    dl_dir, toolchain, br2_fragments, qemu_version, qemu_bug, **kw):
    """The one-shot: build the guest artifacts and (armv7) QEMU with -savedirtylog, then verify.

    --qemu patched (default for armv7) builds or reuses the patched QEMU; --qemu stock uses the
    system's qemu-system-*; --qemu PATH a binary of your own.
    """
    choice = kw["qemu"] or ("patched" if arch == "armv7" else "stock")
    if qemu_bug and choice != "patched":
        raise click.UsageError("--qemu-bug builds a defect into the patched QEMU: it needs --qemu patched")
    _build(console, out, offline, mirror, cache_dir, arch, runtime, engine, buildroot_dir, dl_dir, toolchain,
           br2_fragments, buildroot_url)
    if choice == "patched":
        kw["qemu"] = _build_patched_qemu(console, out, qemu_version, mirror, cache_dir, offline, runtime, qemu_bug)
    elif choice == "stock":
        kw["qemu"] = None
    _verify(console, out, **kw)


# -- compare --------------------------------------------------------------------------------------
@cli.command()
@click.argument("image_a", type=click.Path(path_type=Path))
@click.argument("image_b", type=click.Path(path_type=Path))
@click.option("--page-size", type=click.IntRange(512, 1 << 30), default=4096, show_default=True)
@click.option("--ram-base", default="0x80000000", show_default=True,
              help="Guest-physical address of the images' first byte (vexpress-a15: 0x80000000).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the result as JSON.")
@click.pass_obj
def compare(console, image_a, image_b, page_size, ram_base, json_path):
    """Compare two RAM images page by page; exit 0 when identical, 1 listing every differing page."""
    from verifier.analysis.compare import compare_images, guest_phys_addr
    try:
        base = int(ram_base, 0)
    except ValueError:
        raise click.BadParameter(f"{ram_base!r} is not a number", param_hint="--ram-base") from None
    result = compare_images(image_a, image_b, page_size=page_size)
    out = click.get_text_stream("stdout")
    for p in result.diff_pages:
        out.write(f"page {p} offset {p * page_size:#x} guest_phys_addr {guest_phys_addr(p, base, page_size):#x}\n")
    if json_path:
        json_path.write_text(json.dumps(result.to_dict(max_pages=len(result.diff_pages)), indent=2) + "\n")
    if result.identical:
        out.write(f"identical: {result.page_count} pages of {page_size} bytes\n")
        sys.exit(EXIT_PASS)
    out.write(f"differ: {result.diff_count} of {result.page_count} pages in {len(result.diff_ranges())} ranges\n")
    sys.exit(EXIT_DIFFERENCES)


_register_matrix_commands(cli)
_register_stream_command(cli)


def main(argv=None) -> None:
    """Entry point: the only place where exceptions become exit codes."""
    run_main(cli, argv)

if __name__ == "__main__":  # pragma: no cover
    main()
