"""`dirtylog`: build guest artifacts, verify dirty page logging across a live migration, compare.

Exit codes (dirtylog/console.py): 0 pass, 1 verification found differences, 2 usage or input error,
3 infrastructure failure (QEMU crashed, migration failed, download failed), 4 internal error,
130 interrupted.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from dirtylog.cli_matrix import register as _register_matrix_commands

from dirtylog.console import EXIT_DIFFERENCES, EXIT_INFRA, EXIT_PASS, Console, fail as _fail, run_main

class ByteRate(click.ParamType):
    """Bytes per second by verifier.units' rule: 50000000, 50M (10^6) or 48Mi (2^20)."""

    name = "BYTES_PER_S"

    def convert(self, value, param, ctx):
        from verifier.errors import InputError
        from verifier.units import parse_rate
        try:
            return parse_rate(value)
        except InputError as exc:
            self.fail(str(exc), param, ctx)


class WorkloadSpec(click.ParamType):
    name = "TOTAL:DIRTY:INTERVAL_MS"

    def convert(self, value, param, ctx):
        from verifier.errors import InputError
        from verifier.workload import Workload, parse_workload
        if isinstance(value, Workload):
            return value
        try:
            return parse_workload(value)
        except InputError as exc:
            self.fail(str(exc), param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True,
              help="Show QEMU command lines and QMP traffic (always kept in the run directory's qmp-*.log).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict.")
@click.version_option(package_name="dirtylog")
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
        rt = get_runtime(runtime, log=console.detail)
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
    rt = get_runtime(runtime, log=console.detail)
    console.step(f"building {arch} guest artifacts into {out} (runtime: {rt.name})")
    manifest = rt.build(out, arch=arch, offline=offline, mirror=mirror, cache_dir=cache_dir, log=console.step)
    for entry in manifest["files"]:
        console.step(f"  {entry['name']}  {entry['sha256']}")
    return manifest


def _build_patched_qemu(console, out, version, mirror, cache_dir, offline, runtime="host") -> str:
    """Build (or reuse) QEMU with -savedirtylog and record it in the artifacts' manifest."""
    from builder.cache import Cache
    from builder.qemu_build import build_patched_qemu
    from builder.runtime import get_runtime
    console.step(f"building (or reusing) QEMU {version} with -savedirtylog")
    rt = get_runtime(runtime, log=console.detail)
    if hasattr(rt, "build_qemu"):  # a container builds it into the shared cache; the host reuses it
        rt.build_qemu(version, cache_dir=cache_dir, mirror=mirror, offline=offline, log=console.step)
    qb = build_patched_qemu(version, Cache(cache_dir), mirror=mirror, offline=offline, log=console.step,
                            progress=sys.stderr.isatty())
    from builder.manifest import amend_manifest
    amend_manifest(out, {"qemu": {"path": str(qb.qemu_system_arm), "version": qb.version, "patched": True,
                                  "source_package": qb.source_package, "source_version": qb.source_version,
                                  "patches": list(qb.patches), "cache_key": qb.cache_key}}, what="--qemu patched")
    console.step(f"  {qb.qemu_system_arm} ({qb.version_text}{', cached' if qb.cache_hit else ''})")
    return str(qb.qemu_system_arm)


@cli.command()
@build_options
@click.option("--qemu", "qemu_kind", type=click.Choice(["stock", "patched"]), default="stock", show_default=True,
              help="patched: also build (or reuse) QEMU with -savedirtylog from Debian's source package, "
                   "recorded in the manifest so that verify uses it.")
@click.pass_obj
def build(console, out, offline, mirror, cache_dir, arch, runtime, engine, buildroot_dir, buildroot_url, dl_dir,
          toolchain, br2_fragments, qemu_version, qemu_kind):
    """Build the guest artifacts and manifest.json.

    armv7: zImage, guest_a15x2.dtb, initrd.cpio-dirtyram.gz, dirtyram.arm; aarch64: Image,
    initrd.cpio-dirtyram.gz, dirtyram.aarch64; x86_64: bzImage, initrd.cpio-dirtyram.gz,
    dirtyram.x86_64.
    """
    _build(console, out, offline, mirror, cache_dir, arch, runtime, engine, buildroot_dir, dl_dir, toolchain,
           br2_fragments, buildroot_url)
    if qemu_kind == "patched":
        _build_patched_qemu(console, out, qemu_version, mirror, cache_dir, offline, runtime)
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
    opts = [
        click.option("--qemu", default=None,
                     help="QEMU system emulator to test (default: the one recorded in the manifest, else "
                          "qemu-system-arm, -aarch64 or -x86_64 by machine). make-and-verify also takes "
                          "'patched' (its default for armv7) or 'stock'."),
        click.option("--machine", type=click.Choice(["vexpress-a15", "virt", "virt-aarch64", "q35"]), default=None,
                     help="Guest machine model (default: the manifest's; armv7: vexpress-a15 as in 2014, or virt)."),
        click.option("--machine-opts", default="", metavar="PROP=VALUE[,...]",
                     help="Extra -machine properties, e.g. secure=off for vexpress-a15 (docs/verifying.md)."),
        click.option("--no-cpu-state", "no_cpu_state", is_flag=True,
                     help="Do not compare the vCPUs' registers (read through QEMU's gdbstub) after the "
                          "migration; the report records that they were not compared."),
        click.option("--smp", type=int, default=2, show_default=True, help="Guest vCPUs."),
        click.option("--mem", "mem_mb", type=int, default=256, show_default=True, help="Guest RAM in MiB."),
        click.option("--max-bandwidth", type=ByteRate(), default=None,
                     help="Fix the migration bandwidth (bytes/s; 50M = 50*10^6, 48Mi = 48*2^20). "
                          "Default: throttled until --min-passes dirty syncs, then released."),
        click.option("--min-passes", type=click.IntRange(1, 1000), default=4, show_default=True,
                     help="Dirty-bitmap syncs to force while the workload runs before letting it converge."),
        click.option("--workload", "workloads", type=WorkloadSpec(), multiple=True,
                     help="A dirtyram instance TOTAL:DIRTY:INTERVAL_MS in 4 KiB pages; repeatable. "
                          "Default: the 2014 procedure's 512:512:50 512:512:50 50:50:5."),
        click.option("--trials", type=click.IntRange(1, 1000), default=1, show_default=True,
                     help="Independent migrations to run."),
        click.option("--capture", type=click.Choice(["auto", "savedirtylog", "backing-file", "pmemsave"]),
                     default="auto", show_default=True,
                     help="How guest RAM is captured on each side (auto: -savedirtylog when the QEMU has it, "
                          "else the RAM backing file)."),
        click.option("--transport", type=click.Choice(["unix", "tcp"]), default="unix", show_default=True,
                     help="Migration channel between the two local QEMUs."),
        click.option("--migration-address", default="127.0.0.1", show_default=True,
                     help="Address for --transport tcp; with --dst-host, the destination host's address on "
                          "the migration network (its QEMU listens there)."),
        click.option("--src-host", metavar="USER@HOST[:PORT]|local",
                     help="Run the source QEMU on this host over SSH (QMP and serial forwarded as unix "
                          "sockets; capture with pmemsave there; only differing pages are fetched)."),
        click.option("--dst-host", metavar="USER@HOST[:PORT]|local",
                     help="Run the destination QEMU on this host over SSH; needs --migration-address."),
        click.option("--ssh-identity", type=click.Path(path_type=Path), help="Private key for --src-host/--dst-host."),
        click.option("--known-hosts", type=click.Path(path_type=Path),
                     help="known_hosts file for --src-host/--dst-host (unknown host keys are always refused)."),
        click.option("--remote-dir", default="/var/tmp/dirtylog-remote", show_default=True,
                     help="Run directories and file cache on --src-host/--dst-host."),
        click.option("--dst-qemu", metavar="PATH",
                     help="With --src-host/--dst-host: the destination's QEMU when it is not --qemu (e.g. "
                          "another version; needs --allow-qemu-mismatch then)."),
        click.option("--allow-qemu-mismatch", is_flag=True,
                     help="With --src-host/--dst-host: run although the two hosts' QEMUs report different "
                          "versions (a cross-version migration); both versions go to report.json."),
        click.option("--migration-timeout", type=float, default=180.0, show_default=True,
                     help="Seconds before a migration that does not converge is a failure."),
        click.option("--boot-timeout", type=float, default=120.0, show_default=True,
                     help="Seconds to wait for the guest's readiness marker."),
        click.option("--kernel", type=click.Path(path_type=Path), help="Use this zImage (bring your own guest)."),
        click.option("--dtb", type=click.Path(path_type=Path), help="Use this device tree."),
        click.option("--initrd", type=click.Path(path_type=Path),
                     help="Use this initrd (gzip or plain cpio). A foreign one is ready at its shell prompt."),
        click.option("--guest-cmd", "guest_cmds", multiple=True, metavar="COMMAND",
                     help="Typed at the guest's shell prompt after boot (the 2014 way); repeatable."),
        click.option("--ready-pattern", metavar="REGEX",
                     help="Console output that says the guest is ready (default: DIRTYLOG-READY, or a "
                          "shell prompt for a foreign initrd)."),
        click.option("--inject", metavar="KIND[:N]",
                     help="Negative control: untracked-writes[:N] (host writes behind QEMU's back into N "
                          "source pages just before switchover) or corrupt-capture[:N] (flip bytes in N "
                          "pages of the destination image) or cpu-register[:N] (change N registers of the "
                          "destination's vCPU 0 through its gdbstub before it is read, restore them after). "
                          "The run must FAIL and name those pages or registers."),
        click.option("--capability", "capabilities", multiple=True, metavar="NAME=on|off",
                     help="Migration capability on both sides, e.g. multifd=on, xbzrle=on, auto-converge=on."),
        click.option("--parameter", "parameters", multiple=True, metavar="NAME=VALUE",
                     help="Migration parameter on the source, e.g. multifd-channels=4, xbzrle-cache-size=64Mi (sizes: 64M = 64*10^6, 64Mi = 64*2^20)."),
        click.option("--postcopy", is_flag=True,
                     help="Switch to postcopy after the forced passes (destination stays paused)."),
        click.option("--accel", type=click.Choice(["tcg", "kvm"]), default="tcg", show_default=True,
                     help="Accelerator. KVM needs an arm64 host with a usable /dev/kvm and --machine virt."),
        click.option("--tcg-thread", type=click.Choice(["single", "multi"]),
                     help="TCG threading (default: QEMU's, multi-threaded with several vCPUs)."),
        click.option("--kvm-dirty-ring", type=click.IntRange(1024, 65536),
                     help="Use KVM's dirty ring with this many entries instead of the dirty bitmap."),
        click.option("--seed", type=int, help="Seed for the random choices of --inject."),
        click.option("--host-backing", type=click.Choice(["auto", "anon", "file", "memfd", "memfd-hugetlb", "thp"]),
                     default="auto", show_default=True,
                     help="What backs guest RAM on the host (auto: a shared file for --capture backing-file, "
                          "anonymous memory otherwise). The report states the page sizes really in effect."),
        click.option("--guest-pages", type=click.Choice(["4k", "hugetlb", "thp"]), default="4k", show_default=True,
                     help="How dirtyram maps its buffers in the guest: 4 KiB pages, 2 MiB MAP_HUGETLB "
                          "(the initrd reserves them) or MADV_HUGEPAGE."),
        click.option("--run-dir", type=click.Path(path_type=Path),
                     help="Where this run's files go (default: ./dirtylog-runs/<time>-<id>)."),
        click.option("--json", "json_path", type=click.Path(path_type=Path),
                     help="Also write the JSON report here."),
        click.option("--delete-images", is_flag=True,
                     help="Delete the RAM images of trials that passed (failed trials keep theirs)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _key_values(items, option: str, booleans: bool) -> dict:
    from verifier.errors import InputError
    from verifier.units import looks_like_size, parse_bytes
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE", param_hint=option)
        if booleans:
            if value not in ("on", "off", "true", "false"):
                raise click.BadParameter(f"{item!r}: the value must be on or off", param_hint=option)
            out[name] = value in ("on", "true")
        elif re.fullmatch(r"\d+", value):
            out[name] = int(value)
        elif looks_like_size(value):
            try:
                out[name] = parse_bytes(value)
            except InputError as exc:
                raise click.BadParameter(f"{item!r}: {exc}", param_hint=option) from None
        elif value in ("on", "off", "true", "false"):
            out[name] = value in ("on", "true")
        else:
            out[name] = value
    return out


def _verify(console, artifacts, **kw):
    from verifier.artifacts import foreign_artifacts, load_artifacts
    from verifier.inject import parse_inject
    from verifier.run import VerifyOptions, verify
    from verifier.workload import SEED_WORKLOADS
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
    opts = VerifyOptions(
        qemu=kw["qemu"], smp=kw["smp"], mem_mb=kw["mem_mb"], max_bandwidth=kw["max_bandwidth"],
        workloads=tuple(kw["workloads"]) or SEED_WORKLOADS, trials=kw["trials"], run_dir=kw["run_dir"],
        capture=kw["capture"], transport=kw["transport"], migration_address=kw["migration_address"],
        min_passes=kw["min_passes"], migration_timeout_s=kw["migration_timeout"],
        boot_timeout_s=kw["boot_timeout"], delete_images=kw["delete_images"], machine=kw["machine"],
        inject=parse_inject(kw["inject"]), capabilities=_key_values(kw["capabilities"], "--capability", True),
        parameters=_key_values(kw["parameters"], "--parameter", False), postcopy=kw["postcopy"],
        accel=kw["accel"], tcg_thread=kw["tcg_thread"], kvm_dirty_ring=kw["kvm_dirty_ring"],
        guest_cmds=tuple(kw["guest_cmds"]), ready_pattern=kw["ready_pattern"], seed=kw["seed"],
        host_backing=kw["host_backing"], guest_pages=kw["guest_pages"], machine_opts=kw["machine_opts"],
        cpu_state=not kw["no_cpu_state"], src_host=kw["src_host"], dst_host=kw["dst_host"],
        ssh_identity=str(kw["ssh_identity"]) if kw["ssh_identity"] else None,
        known_hosts=str(kw["known_hosts"]) if kw["known_hosts"] else None, remote_dir=kw["remote_dir"],
        dst_qemu=kw["dst_qemu"], allow_qemu_mismatch=kw["allow_qemu_mismatch"])
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
              help="Run every scenario of this TOML matrix (matrices/, docs/report-schema.md) instead of one "
                   "verification; scenario options then come from the file.")
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
                    dl_dir, toolchain, br2_fragments, qemu_version, **kw):
    """The one-shot: build the guest artifacts and (armv7) QEMU with -savedirtylog, then verify.

    --qemu patched (default for armv7) builds or reuses the patched QEMU; --qemu stock uses the
    system's qemu-system-*; --qemu PATH a binary of your own.
    """
    _build(console, out, offline, mirror, cache_dir, arch, runtime, engine, buildroot_dir, dl_dir, toolchain,
           br2_fragments, buildroot_url)
    choice = kw["qemu"] or ("patched" if arch == "armv7" else "stock")
    if choice == "patched":
        kw["qemu"] = _build_patched_qemu(console, out, qemu_version, mirror, cache_dir, offline, runtime)
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
    from verifier.compare import compare_images, guest_phys_addr
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


def main(argv=None) -> None:
    """Entry point: the only place where exceptions become exit codes."""
    run_main(cli, argv)

if __name__ == "__main__":  # pragma: no cover
    main()
