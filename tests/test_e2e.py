"""End to end: real artifacts, real QEMU processes, real migrations under TCG.

Known fact pinned here (see ENVIRONMENT.md): Debian 12's QEMU 7.2 under multi-threaded TCG with
bandwidth-limited precopy loses dirty pages; with one vCPU it does not.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DIRTYLOG, pass_or_known_72_loss, qemu_processes_under, run_dirtylog, sigint_default

pytestmark = pytest.mark.e2e


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def test_rebuild_gives_byte_identical_artifacts(artifacts, tmp_path):
    res = run_dirtylog("build", "--out", tmp_path / "again", "--offline")
    assert res.returncode == 0, res.stderr
    first = json.loads((artifacts / "manifest.json").read_text())["files"]
    second = json.loads((tmp_path / "again" / "manifest.json").read_text())["files"]
    assert {f["name"]: f["sha256"] for f in first} == {f["name"]: f["sha256"] for f in second}
    assert {f["name"] for f in first} == {"zImage", "guest_a15x2.dtb", "initrd.cpio-dirtyram.gz", "dirtyram.arm"}


def test_single_pass_migration_passes_and_keeps_its_evidence(artifacts, tmp_path):
    """Debian's QEMU 7.2 under TCG loses dirty bits whenever the migration needs several passes
    (measured here: 2 of 4 single-vCPU runs with the default forced passes, more under load), so
    a PASS on it is pinned for the one-pass case: anonymous RAM, no forced passes. The report
    must then warn that a single pass tests little."""
    run_dir = tmp_path / "run"
    res = run_dirtylog("verify", "--artifacts", artifacts, "--machine", "virt", "--smp", "1",
                       "--min-passes", "1", "--capture", "pmemsave",
                       "--run-dir", run_dir, "--json", tmp_path / "out.json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("dirtylog verify: PASS")
    report = _report(run_dir)
    assert report == json.loads((tmp_path / "out.json").read_text())
    trial = report["trials"][0]
    assert trial["verdict"] == "pass"
    assert trial["compare"]["diff_count"] == 0
    assert trial["compare"]["page_count"] == 256 * 256
    assert trial["resume"]["ok"] is True
    assert trial["destination_invariant"] == []
    assert trial["migration"]["transferred_bytes"] > 0
    # device state: both stopped VMs saved theirs, compared field by field with each other and with
    # the stream's device sections, by the stream's VMDESCRIPTION
    dev = trial["device_state"]
    assert trial["checks"]["device_state"] == {"ok": True, "text": "device state identical"}, dev
    assert dev["described"] and list(dev["pairs"]) == ["source/destination", "stream/destination", "stream/source"]
    assert all(p["fields_compared"] > 5000 and not p["compared_as_bytes"] for p in dev["pairs"].values()), dev
    assert res.stdout.splitlines()[0].endswith("CPU state identical; device state identical; guest ran after resume")
    if trial["migration"]["dirty_sync_count"] <= 2:
        assert any("single pass" in w for w in trial["warnings"])
    tdir = run_dir / "trial-01"
    for name in ("serial-src.log", "serial-dst.log", "qmp-src.log", "qmp-dst.log", "timeline.jsonl",
                 "ram-src.img", "ram-dst.img", "cmdline-src.txt", "qemu-src.log", "devstate-src.bin",
                 "devstate-dst.bin"):
        assert (tdir / name).is_file(), name
    serial = (tdir / "serial-src.log").read_text(errors="replace")
    assert "DIRTYLOG-READY n=3" in serial
    assert serial.count("initial pass done") == 3
    # The destination guest ran after the migration: it answered on its console.
    assert "dirtylog-alive-" in (tdir / "serial-dst.log").read_text(errors="replace")
    assert (tdir / "ram-src.img").stat().st_size == 256 << 20
    assert qemu_processes_under(tmp_path) == []
    # The kept images compare equal with the standalone command too.
    res = run_dirtylog("compare", tdir / "ram-src.img", tdir / "ram-dst.img")
    assert res.returncode == 0 and "identical" in res.stdout


def test_multithreaded_tcg_with_limited_bandwidth_is_reported_as_stale_pages(artifacts, debian_qemu72, tmp_path):
    """QEMU 7.2 MTTCG loses dirty bits (15 of 16 runs measured, 4 of 4 here with 6 forced
    passes): this pins the FAIL verdict and the listing of the lost pages as stale dirtyram
    generations. The loss is random: one CI run of 3 trials lost a single kernel page and nothing
    else (2026-12-04), so up to three runs of 3 trials are made until dirtyram pages go stale;
    every failure of every run must be listed and diagnosed correctly."""
    all_kinds: set = set()
    outputs = ""
    for attempt in range(1, 4):
        run_dir = tmp_path / f"run{attempt}"
        res = run_dirtylog("verify", "--artifacts", artifacts, "--qemu", debian_qemu72, "--machine", "virt",
                           "--smp", "2", "--max-bandwidth", "50M", "--min-passes", "6", "--trials", "3",
                           "--run-dir", run_dir)
        report = _report(run_dir)
        assert report["qemu"]["version"].startswith("7.2"), report["qemu"]
        outputs += res.stdout
        if res.returncode == 0:
            assert report["verdict"] == "pass"
            continue
        assert res.returncode == 1, res.stdout + res.stderr
        assert report["verdict"] == "fail"
        failed = [t for t in report["trials"] if t["verdict"] == "fail"]
        assert failed
        for t in failed:
            assert t["compare"]["diff_count"] > 0
            assert t["differences"], "every differing page must be listed"
            assert [f["id"] for f in t["known_findings"]] == ["qemu72-tcg-lost-dirty-pages"]
            kinds = {d["diagnosis"] for d in t["differences"]}
            assert "impossible" not in kinds
            all_kinds |= kinds
            for d in t["differences"]:
                assert int(d["start"], 16) >= 0x40000000
            stale = [d for d in t["differences"] if d["diagnosis"] == "stale"]
            assert all(d["lag_min"] >= 1 and d["instance_id"] in (1, 2, 3) for d in stale), stale
            # the stream says where: the destination holds the last copy sent, an older one (dirty bit lost)
            assert all(d["provenance"]["classes"] == {"not-resent": d["pages"]} for d in stale), \
                [d.get("provenance") for d in stale]
            assert all("last sent in iteration" in d["provenance"]["text"] for d in stale)
            # ... in which pass, i.e. after which dirty-bitmap sync the lost write happened (from the
            # source's MIGRATION_PASS events and the tap's clock), within the migration's own syncs
            syncs = t["migration"]["dirty_sync_count"]
            table = t["stream"]["provenance"]["syncs"]
            assert table["dirty_sync_count"] == syncs and table["basis"] == "MIGRATION_PASS events", table
            for d in stale:
                text = d["provenance"]["text"]
                m = re.search(r"\(pass (\d+)(?:-(\d+))? of (\d+)\) on channel main.*; source gen \d+ "
                              r"written after sync (\d+)(?:-(\d+))? and not sent again", text)
                assert m, text
                lo, hi = int(m[4]), int(m[5] or m[4])
                assert (int(m[1]), int(m[2] or m[1]), int(m[3])) == (lo, hi, syncs), text
                assert 1 <= lo <= hi <= syncs and d["provenance"]["sync"] == [lo, hi], (text, syncs)
        if "stale" in all_kinds:
            break
    assert "stale" in all_kinds, all_kinds
    assert "stale" in outputs


def test_vexpress_destination_that_does_not_run_after_migration_is_a_fail(artifacts, tmp_path):
    """Found here: with Debian's QEMU 7.2 under TCG, a vexpress-a15 guest never runs again on
    the destination (its vCPU loops on the prefetch-abort vector) although its RAM is intact."""
    run_dir = tmp_path / "run"
    # A single pass: Debian's 7.2 also loses dirty pages in multi-pass runs under load, which
    # would add a second finding to the one this test is about.
    res = run_dirtylog("verify", "--artifacts", artifacts, "--smp", "1", "--machine-opts", "secure=on",
                       "--min-passes", "1", "--capture", "pmemsave", "--run-dir", run_dir)
    report = _report(run_dir)
    assert report["machine"] == "vexpress-a15"
    trial = report["trials"][0]
    assert report["notes"] == []  # the user chose secure=on: no default applied
    assert res.returncode == 1, res.stdout + res.stderr
    assert trial["verdict"] == "fail"
    assert trial["resume"]["ok"] is False
    assert "pc 0xffff000c" in trial["resume"]["detail"]
    assert "destination did not run after resuming" in res.stdout
    assert "known finding arm-secure-cp15-banks-not-migrated" in res.stdout
    assert [f["id"] for f in trial["known_findings"]] == ["arm-secure-cp15-banks-not-migrated"]
    # The cause, not only the symptom: the Secure CP15 banks are zero on the destination.
    differing = {d["register"] for d in trial["cpu_state"]["differences"]}
    assert {"TTBR1_S", "DACR_S"} <= differing, differing
    assert all(d["register"].endswith("_S") for d in trial["cpu_state"]["differences"])
    assert trial["checks"]["memory"]["ok"] is True
    first = res.stdout.splitlines()[0]
    assert "CPU state: " in first and "TTBR1_S" in first and "guest did not run after resume" in first


def test_vexpress_under_tcg_defaults_to_secure_off_and_says_why(artifacts, tmp_path):
    """The 2014 procedure ran under KVM (no EL3: Linux Non-secure); under TCG the faithful default
    is secure=off, chosen and stated."""
    run_dir = tmp_path / "run"
    res = run_dirtylog("verify", "--artifacts", artifacts, "--smp", "1", "--min-passes", "1",
                       "--capture", "pmemsave", "--run-dir", run_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    report = _report(run_dir)
    assert "vexpress-a15,secure=off" in " ".join(report["trials"][0]["cmdlines"]["src"])
    assert report["options"]["machine_opts"] == "secure=off"
    assert report["notes"] and "secure=off chosen" in report["notes"][0]
    assert "note: vexpress-a15 under TCG: secure=off chosen" in res.stdout


def test_vexpress_destination_resumes_when_linux_runs_non_secure(artifacts, tmp_path):
    """The cause of the failure above: under TCG the Secure banks of DACR/TTBR1/... are not
    migrated. With secure=off Linux runs Non-secure and the same guest resumes."""
    run_dir = tmp_path / "run"
    res = run_dirtylog("verify", "--artifacts", artifacts, "--smp", "1", "--machine-opts", "secure=off",
                       "--min-passes", "1", "--capture", "pmemsave", "--run-dir", run_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    trial = _report(run_dir)["trials"][0]
    assert trial["resume"]["ok"] is True
    assert "vexpress-a15,secure=off" in " ".join(trial["cmdlines"]["src"])


def test_tcp_transport_and_deleted_images_of_a_passing_trial(artifacts, tmp_path):
    run_dir = tmp_path / "run"
    res = run_dirtylog("verify", "--artifacts", artifacts, "--machine", "virt", "--smp", "1", "--capture", "pmemsave",
                       "--min-passes", "1", "--transport", "tcp", "--workload", "256:64:20", "--run-dir", run_dir,
                       "--delete-images")
    assert res.returncode == 0, res.stdout + res.stderr
    report = _report(run_dir)
    assert report["capture"] == "pmemsave"
    assert "tcp:127.0.0.1:" in " ".join(report["trials"][0]["cmdlines"]["dst"]) or \
        "tcp:127.0.0.1:" in (run_dir / "trial-01" / "qmp-dst.log").read_text()
    assert report["trials"][0]["images_deleted"] is True
    assert not (run_dir / "trial-01" / "ram-src.img").exists()


def _start_slow_migration(artifacts: Path, run_dir: Path) -> subprocess.Popen:
    """A verify run whose 2 MB/s migration is still going when this returns."""
    proc = subprocess.Popen([*DIRTYLOG, "verify", "--artifacts", str(artifacts), "--machine", "virt",
                             "--smp", "1", "--max-bandwidth", "2M", "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    timeline = run_dir / "trial-01" / "timeline.jsonl"
    deadline = time.monotonic() + 120
    while not (timeline.exists() and timeline.stat().st_size > 0):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("the migration never started: " + proc.communicate()[1])
        time.sleep(0.2)
    return proc


def test_ctrl_c_during_migration_stops_every_qemu_and_exits_130(artifacts, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_slow_migration(artifacts, run_dir)
    assert len(qemu_processes_under(tmp_path)) == 2
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "Traceback" not in err
    assert qemu_processes_under(tmp_path) == []
    assert _report(run_dir)["verdict"] == "interrupted"


def test_destination_qemu_killed_mid_migration_is_an_infrastructure_failure(artifacts, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_slow_migration(artifacts, run_dir)
    dst = [p for p in qemu_processes_under(tmp_path) if p]
    pids = [int(line.split()[0]) for line in dst
            if b"-incoming" in Path(f"/proc/{line.split()[0]}/cmdline").read_bytes()]
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, out + err
    assert err.strip().splitlines()[-1].startswith("dirtylog: error:")
    assert "Traceback" not in err
    assert qemu_processes_under(tmp_path) == []
    assert _report(run_dir)["verdict"] == "error"


def test_make_and_verify_builds_then_verifies_in_one_command(artifacts, tmp_path):
    out = tmp_path / "art"
    res = run_dirtylog("make-and-verify", "--out", out, "--offline", "--machine", "virt", "--smp", "1",
                       "--min-passes", "1", "--capture", "pmemsave", "--workload", "128:128:20",
                       "--run-dir", tmp_path / "run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "manifest.json").is_file()
    report = _report(tmp_path / "run")
    assert report["options"]["workloads"] == ["128:128:20"]
    assert report["artifacts"]["files"]["initrd"]["sha256"] == json.loads(
        (artifacts / "manifest.json").read_text())["files"][2]["sha256"]


@pytest.mark.parametrize("kind", ["untracked-writes", "corrupt-capture"])
def test_negative_control_fails_and_names_exactly_the_injected_pages(artifacts, tmp_path, kind):
    run_dir = tmp_path / "run"
    res = run_dirtylog("verify", "--artifacts", artifacts, "--machine", "virt", "--smp", "1",
                       "--inject", f"{kind}:6", "--seed", "7", "--run-dir", run_dir)
    assert res.returncode == 1, res.stdout + res.stderr
    report = _report(run_dir)
    inj = report["trials"][0]["injection"]
    assert inj["kind"] == kind and inj["injected"] == 6 and inj["detected"] == 6 and inj["missed"] == []
    listed = {d["start"] for d in report["trials"][0]["differences"]}
    assert set(inj["addresses"]) <= listed
    if report["qemu"]["version"].split(".")[0] != "7":  # 7.2 loses dirty pages of its own
        assert inj["other_differences"] == 0
    if kind == "untracked-writes":
        kinds = {d["start"]: d["diagnosis"] for d in report["trials"][0]["differences"]}
        assert all(kinds[a] == "never-sent" for a in inj["addresses"])
    assert f"{kind}: 6 of 6 injected pages detected" in res.stdout


def test_foreign_2014_style_initrd_with_workload_typed_at_the_prompt(artifacts, tmp_path):
    """The 2014 initrd was a plain cpio named .gz whose /init dropped to a shell; the workload
    was typed by hand. Same here, through --initrd and --guest-cmd."""
    import gzip
    from builder.cpio import CpioWriter, iter_newc
    members = list(iter_newc(gzip.decompress((artifacts / "initrd.cpio-dirtyram.gz").read_bytes())))
    foreign = tmp_path / "initrd.cpio-dirtyram.gz"
    with open(foreign, "wb") as f, CpioWriter(f, mtime=0) as w:
        for m in members:
            kind = m.mode & 0o170000
            if m.name == "init":
                w.add_file("init", b"#!/bin/sh\nmount -t proc proc /proc\nmount -t devtmpfs dev /dev\nexec </dev/console >/dev/console 2>&1\nexec /bin/sh\n", 0o755)
            elif kind == 0o040000:
                w.add_dir(m.name, m.mode & 0o7777)
            elif kind == 0o120000:
                w.add_symlink(m.name, m.data.decode())
            elif kind == 0o020000:
                w.add_chardev(m.name, m.rdevmajor, m.rdevminor, m.mode & 0o7777)
            else:
                w.add_file(m.name, m.data, m.mode & 0o7777)
    run_dir = tmp_path / "run"
    res = run_dirtylog("verify", "--artifacts", tmp_path / "none", "--kernel", artifacts / "zImage",
                       "--initrd", foreign, "--machine", "virt", "--smp", "1", "--min-passes", "1",
                       "--capture", "pmemsave", "--guest-cmd", "cd /root",
                       "--guest-cmd", "./dirtyram.arm 512 512 50 &", "--run-dir", run_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "is named .gz but is a newc cpio archive" in res.stderr
    serial = (run_dir / "trial-01" / "serial-src.log").read_text(errors="replace")
    assert "param: total=0x200, dirty ram=0x200, interval=50 mS" in serial


@pytest.fixture
def host_hugepages():
    """Reserve 2 MiB huge pages for two 256 MiB guests, then give them back."""
    knob = Path("/proc/sys/vm/nr_hugepages")
    before = knob.read_text()
    knob.write_text("300")
    yield int(knob.read_text())
    knob.write_text(before)


def test_huge_pages_on_both_layers_are_reported_as_read_back(artifacts, tmp_path, host_hugepages):
    assert host_hugepages >= 256
    run_dir = tmp_path / "run"
    res = run_dirtylog("verify", "--artifacts", artifacts, "--machine", "virt", "--smp", "1", "--min-passes", "1",
                       "--host-backing", "memfd-hugetlb", "--guest-pages", "hugetlb",
                       "--workload", "1024:512:50", "--workload", "16:16:10", "--run-dir", run_dir)
    pass_or_known_72_loss(res, _report(run_dir))
    pages = _report(run_dir)["trials"][0]["page_sizes"]
    assert pages["host"]["src"]["kernel_page_size_kb"] == 2048
    assert pages["guest"]["hugepages_reserved"] == pages["guest"]["hugepages_requested"] == 3
    assert pages["guest"]["dirtyram_flags"] == ["101"]  # format v1 + MAP_HUGETLB
    assert "2048 kB pages" in res.stdout


def _timeline(run_dir: Path) -> list[dict]:
    lines = (run_dir / "trial-01" / "timeline.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("mode,args,proof", [
    ("multifd", ["--capability", "multifd=on", "--parameter", "multifd-channels=2"],
     lambda tl: max(s["ram"].get("multifd-bytes", 0) for s in tl) > 0),
    ("xbzrle", ["--capability", "xbzrle=on", "--parameter", "xbzrle-cache-size=16Mi"],
     lambda tl: any("xbzrle-cache" in s for s in tl)),
    ("auto-converge", ["--capability", "auto-converge=on", "--parameter", "cpu-throttle-initial=30"],
     None),  # throttling only starts when passes do not converge; the capability itself is checked
    ("postcopy", ["--postcopy", "--capture", "pmemsave", "--max-bandwidth", "20M"],
     lambda tl: any(s["status"] == "postcopy-active" for s in tl)),
])
def test_migration_modes_really_run_and_get_a_verdict(artifacts, tmp_path, mode, args, proof):
    """Each mode is set on both QEMUs (the QMP log shows it) and the migration completes with a
    verdict. Debian's QEMU 7.2 may lose dirty pages in any multi-pass mode, so a FAIL of that known
    finding (and only that) is allowed here; the PASS verdicts are pinned by the QEMU 10 tests."""
    run_dir = tmp_path / "run"
    # postcopy switches during the first pass, while there is still much to send
    passes = "1" if mode == "postcopy" else "2"
    res = run_dirtylog("verify", "--artifacts", artifacts, "--machine", "virt", "--smp", "1",
                       "--min-passes", passes, *args, "--run-dir", run_dir)
    report = _report(run_dir)
    pass_or_known_72_loss(res, report)
    qmp = (run_dir / "trial-01" / "qmp-dst.log").read_text()
    cap = "postcopy-ram" if mode == "postcopy" else mode
    assert f'"capability": "{cap}", "state": true' in qmp
    assert proof is None or proof(_timeline(run_dir))


@pytest.mark.parametrize("arch,machine", [("aarch64", "virt-aarch64"), ("x86_64", "q35")])
def test_other_architectures_build_and_verify_on_their_machine(tmp_path, arch, machine):
    out = tmp_path / "art"
    res = run_dirtylog("build", "--arch", arch, "--out", out)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "manifest.json").read_text())["guest"]["machine"] == machine
    run_dir = tmp_path / "run"
    res = run_dirtylog("verify", "--artifacts", out, "--smp", "1", "--min-passes", "1", "--capture", "pmemsave",
                       "--workload", "256:128:20", "--run-dir", run_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    report = _report(run_dir)
    assert report["machine"] == machine and report["trials"][0]["resume"]["ok"]
    cpu = report["trials"][0]["cpu_state"]  # every register of the vCPU, through the gdbstubs
    # measured: aarch64 228 (with the system registers), x86_64 66 (QEMU's x86 stub sends GPRs,
    # segments, x87/SSE, fs/gs bases, control registers and EFER; no other MSRs)
    assert cpu["arch"] == arch and cpu["identical"], cpu
    assert cpu["registers_compared"] >= {"aarch64": 200, "x86_64": 60}[arch], cpu
    assert report["trials"][0]["checks"]["cpu_state"] == {"ok": True, "text": "CPU state identical"}
    print(f"{machine}: {cpu['registers_compared']} registers compared")
    wrong = run_dirtylog("verify", "--artifacts", out, "--machine", "vexpress-a15")
    assert wrong.returncode == 2 and f"these artifacts are {arch}" in wrong.stderr


def test_kvm_is_probed_by_starting_the_guest_never_assumed(tmp_path):
    """`--accel kvm` on this x86_64 host: the outcome depends on the host, but each outcome is
    specific. Here /dev/kvm is a paravirtualised KVM on which QEMU aborts setting the vCPU's MSRs:
    the run must say "KVM is not usable here" with QEMU's reason, exit 3 and leave no QEMU behind."""
    out = tmp_path / "art"
    assert run_dirtylog("build", "--arch", "x86_64", "--out", out).returncode == 0
    run_dir = tmp_path / "kvm"
    res = run_dirtylog("verify", "--artifacts", out, "--smp", "1", "--min-passes", "1", "--capture", "pmemsave",
                       "--workload", "256:128:20", "--accel", "kvm", "--boot-timeout", "30", "--run-dir", run_dir)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert res.returncode == 2 and "/dev/kvm is not usable" in res.stderr, res.stderr
    elif res.returncode == 3:
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("dirtylog: error: KVM is not usable here: "), res.stderr
        assert last.endswith("use --accel tcg") and "Traceback" not in res.stderr
    else:  # a host whose KVM really runs the guest: then the verification itself must pass
        assert res.returncode == 0, res.stdout + res.stderr
        assert _report(run_dir)["trials"][0]["cmdlines"]["src"].count("kvm") >= 1
    assert not qemu_processes_under(tmp_path)
