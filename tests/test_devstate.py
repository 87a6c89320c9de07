"""Device state field by field (verifier.capture.devstate), on files that real QEMUs write.

A paused `-machine virt -S` QEMU (no kernel: the CPU never runs) first saves its device sections
with QMP xen-save-devices-state, then migrates to a file (`exec:cat > FILE`), a stream that ends in
the VMDESCRIPTION naming every field. Both copies come from one stopped VM, so they must agree
field by field; changed copies show that a difference is named `section/field` with both values.
The whole flow (both VMs of a trial saving their state after a real migration) runs in
tests/test_e2e.py.
"""

from __future__ import annotations

import time

import pytest

from verifier.capture import devstate
from verifier.errors import VerifyError

MEM_MB = 64


from test_stream import _qemu72, _qemu100  # noqa: E402 - Debian's 7.2 and the patched 10.0, as there


@pytest.fixture(params=["7.2", pytest.param("10.0", marks=pytest.mark.build)], scope="module")
def saved(request, tmp_path_factory):
    """(device-state file, migration stream file) of one paused virt QEMU."""
    from verifier.run.qemu import QemuProcess
    qemu = _qemu72() if request.param == "7.2" else _qemu100()
    wd = tmp_path_factory.mktemp(f"devstate-{request.param}")
    args = ["-machine", "virt", "-accel", "tcg", "-cpu", "cortex-a15", "-m", str(MEM_MB), "-smp", "2",
            "-display", "none", "-nodefaults", "-S"]
    dev, stream = wd / "dev.bin", wd / "stream.bin"
    with QemuProcess(qemu, args, wd, "src") as q:
        assert devstate.save(q, dev) == dev
        with pytest.raises(devstate.DeviceStateError, match="src QEMU could not save its device state"):
            devstate.save(q, wd / "no-such-dir" / "x.bin")
        q.qmp("migrate", uri=f"exec:cat > {stream}")
        deadline = time.monotonic() + 60
        while q.qmp("query-migrate").get("status") != "completed":
            assert time.monotonic() < deadline, "the migration to a file did not complete"
            time.sleep(0.05)
    return request.param, dev, stream


def _vmdesc(stream):
    sections, vmdesc = devstate.read_file(stream)
    assert len(vmdesc["devices"]) == len(sections)
    return vmdesc


def test_every_section_of_a_device_save_decodes_by_the_streams_description(saved):
    version, dev, stream = saved
    vmdesc = _vmdesc(stream)
    sections = devstate.read_sections(dev)
    in_stream = devstate.read_sections(stream)
    assert [(s["name"], s["instance"]) for s, _ in sections] == [(s["name"], s["instance"]) for s, _ in in_stream]
    assert {"timer", "cpu", "pl011", "globalstate"} <= {s["name"] for s, _ in sections}
    descs = {(d["name"], d["instance_id"]): d for d in vmdesc["devices"]}
    fields = {}
    for s, body in sections:
        label = devstate.section_label(s["name"], s["instance"])
        for f in devstate.decode(body, descs[(s["name"], s["instance"])], label):
            fields[f.path] = f
    # two vCPUs: sections cpu and cpu@1, each with its core registers and the VFP subsection
    assert fields["cpu/env.regs[15]"].type == "uint32" and "cpu@1/env.regs[15]" in fields
    assert any(p.startswith("cpu@1/cpu/vfp/") for p in fields)
    assert fields["pl011/cr"].type == "uint32" and len(fields["pl011/cr"].value) == 4
    assert len(fields) > 5000, len(fields)  # measured: 10952 fields on 10.0, 18 sections
    result = devstate.compare({"source": sections, "destination": devstate.read_sections(dev),
                               "stream": in_stream}, vmdesc, allowlist={})
    assert result["described"]
    assert list(result["pairs"]) == ["source/destination", "stream/destination", "stream/source"]
    for pair in result["pairs"].values():
        assert pair["fields_compared"] == len(fields) and pair["compared_as_bytes"] == []
        assert pair["sections"] == len(sections)
    assert result["pairs"]["source/destination"]["identical"]
    # The one difference between the two ways of saving: a migration records the run state the
    # VM had when it started (prelaunch: -S), xen-save-devices-state always "running"
    # (global_state_store_running()). In a trial the guest runs when it is migrated: no difference.
    for pair in ("stream/destination", "stream/source"):
        other = pair.split("/")[1]
        assert [(d["field"], d["stream"], d[other]) for d in result["pairs"][pair]["differences"]] == [
            ("globalstate/size", "0xa", "0x8"), ("globalstate/runstate", "'prelaunch'", "'running'")]


def _changed(sections, vmdesc, path, xor=0x01):
    """A copy of `sections` with the last byte of field `path` flipped (found by decoding)."""
    name = path.split("/")[0]
    out = []
    for s, body in sections:
        if s["name"] == name and s["instance"] == 0:
            desc = next(d for d in vmdesc["devices"] if (d["name"], d["instance_id"]) == (name, 0))
            pos = 0
            for f in devstate.decode(body, desc, name):
                pos = body.index(f.value, pos) if f.path != path else pos
                if f.path == path:
                    break
                pos += len(f.value)
            b = bytearray(body)
            b[pos + len(f.value) - 1] ^= xor
            body = bytes(b)
        out.append((s, body))
    return out


def test_a_changed_field_is_named_with_both_values_and_an_allowlist_keeps_it_listed(saved):
    _, dev, stream = saved
    vmdesc = _vmdesc(stream)
    src = devstate.read_sections(dev)
    before = {f.path: f for s, b in src if s["name"] == "pl011"
              for f in devstate.decode(b, vmdesc["devices"][[d["name"] for d in vmdesc["devices"]].index("pl011")],
                                       "pl011")}["pl011/cr"]
    dst = _changed(src, vmdesc, "pl011/cr")
    result = devstate.compare({"source": src, "destination": dst}, vmdesc, allowlist={})
    assert not result["identical"]
    diffs = result["pairs"]["source/destination"]["differences"]
    want = int.from_bytes(before.value, "big") ^ 1
    assert diffs == [{"section": "pl011", "field": "pl011/cr", "type": "uint32",
                      "source": hex(int.from_bytes(before.value, "big")), "destination": hex(want)}]
    assert devstate.format_differences(result) == [
        f"source/destination pl011/cr: source {diffs[0]['source']}, destination {hex(want)}"]
    allowed = devstate.compare({"source": src, "destination": dst}, vmdesc, allowlist={"pl011/c?": "a reason"})
    assert allowed["identical"]
    assert allowed["pairs"]["source/destination"]["allowed"] == [{**diffs[0], "reason": "a reason"}]


def test_a_body_the_description_does_not_fit_is_compared_as_bytes_and_says_why(saved):
    _, dev, stream = saved
    vmdesc = _vmdesc(stream)
    src = devstate.read_sections(dev)
    dst = [(s, body[:-1] if s["name"] == "pl011" else body) for s, body in src]
    result = devstate.compare({"source": src, "destination": dst}, vmdesc, allowlist={})
    pair = result["pairs"]["source/destination"]
    assert len(pair["compared_as_bytes"]) == 1 and pair["compared_as_bytes"][0].startswith("pl011: ")
    assert [d["field"] for d in pair["differences"]] == ["pl011 (bytes)"]
    # without any description every section is compared as bytes, and a missing one is named
    bare = devstate.compare({"source": src, "destination": src[:-1]}, None, allowlist={})
    assert not bare["described"]
    last = devstate.section_label(src[-1][0]["name"], src[-1][0]["instance"])
    assert bare["pairs"]["source/destination"]["differences"] == [
        {"section": last, "field": last, "type": "section", "source": "present", "destination": "absent"}]


def test_a_missing_subsection_is_a_layout_error_naming_it():
    desc = {"fields": [{"name": "a", "type": "uint32", "size": 4}],
            "subsections": [{"vmsd_name": "dev/sub", "version": 1,
                             "fields": [{"name": "b", "type": "uint8", "size": 1}]}]}
    body = bytes(4) + bytes([5, 7]) + b"dev/sub" + bytes(4) + b"\x09"
    assert [(f.path, f.value) for f in devstate.decode(body, desc, "dev")] == [("dev/a", bytes(4)),
                                                                               ("dev/dev/sub/b", b"\x09")]
    with pytest.raises(devstate.LayoutError, match="dev/dev/sub: the description has this subsection at offset 4"):
        devstate.decode(bytes(4), desc, "dev")
    assert issubclass(devstate.DeviceStateError, VerifyError) and devstate.DeviceStateError.exit_code == 3


# ============================================================================ in real verifications

@pytest.fixture(scope="module")
def qemu10():
    """QEMU 10.0 (built or reused from the cache): it loses no dirty pages of its own."""
    return _qemu100().path


def _verify(artifacts, qemu, run_dir, *args):
    import json

    from conftest import run_dirtylog
    res = run_dirtylog("verify", "--artifacts", artifacts, "--qemu", qemu, "--machine", "virt", "--smp", "1",
                       "--min-passes", "2", "--workload", "256:64:20", "--run-dir", run_dir, *args)
    return res, json.loads((run_dir / "report.json").read_text())


@pytest.mark.build
@pytest.mark.e2e
def test_stream_device_injection_is_named_exactly_and_the_destination_loaded_what_it_got(artifacts, qemu10,
                                                                                         tmp_path):
    """The tap flips a byte of timer/cpu_ticks_offset in the stream: source and destination differ in
    exactly that field, the stream and the source too, and the destination holds what it received."""
    res, report = _verify(artifacts, qemu10, tmp_path / "run", "--inject", "stream-device")
    assert res.returncode == 1, res.stdout + res.stderr
    t = report["trials"][0]
    inj = t["injection"]
    assert (inj["kind"], inj["fields"], inj["injected"], inj["detected"], inj["missed"], inj["other_differences"]) \
        == ("stream-device", ["timer/cpu_ticks_offset"], 1, 1, [], 0), inj
    pairs = t["device_state"]["pairs"]
    assert pairs["stream/destination"]["identical"]
    (d,) = pairs["source/destination"]["differences"]
    assert d["field"] == "timer/cpu_ticks_offset" and d["type"] == "int64"
    assert int(d["source"], 16) ^ int(d["destination"], 16) == 0xFF  # the low byte, flipped
    assert t["checks"]["device_state"] == {"ok": False, "text": "device state: 1 field differs (timer/cpu_ticks_offset)"}
    assert t["checks"]["memory"]["ok"] and t["checks"]["liveness"]["ok"], t["checks"]
    text = (tmp_path / "run" / "report.txt").read_text()
    assert f"    source/destination timer/cpu_ticks_offset: source {d['source']}, destination {d['destination']}" in text
    assert "negative control stream-device: 1 of 1 injected fields detected, 0 other differing fields" in text


@pytest.mark.build
@pytest.mark.e2e
def test_without_the_stream_sections_are_compared_as_bytes_and_bad_combinations_are_refused(artifacts, qemu10,
                                                                                            tmp_path):
    from conftest import run_dirtylog
    # without the stream a fresh paused QEMU of the same machine describes the sections: every one fits
    res, report = _verify(artifacts, qemu10, tmp_path / "run", "--no-stream")
    assert res.returncode == 0, res.stdout + res.stderr
    dev = report["trials"][0]["device_state"]
    assert dev["described"] and list(dev["pairs"]) == ["source/destination"]
    assert dev["description"] == ("a fresh QEMU of the source's machine, paused and saved "
                                  "(the stream was not parsed: --no-stream)")
    pair = dev["pairs"]["source/destination"]
    assert pair["compared_as_bytes"] == [] and pair["fields_compared"] > 5000, pair
    assert report["trials"][0]["checks"]["device_state"]["ok"] is True
    assert not (tmp_path / "run" / "trial-01" / "devstate-description.bin").exists()
    assert "device state: fields named by a fresh QEMU" in (tmp_path / "run" / "report.txt").read_text()
    # and without any description, sections are compared as bytes (verifier.capture.devstate)
    sections = devstate.read_sections(tmp_path / "run" / "trial-01" / "devstate-src.bin")
    bare = devstate.compare({"source": sections, "destination": sections}, None)
    assert bare["identical"] and not bare["described"]
    assert bare["pairs"]["source/destination"]["fields_compared"] == len(sections)
    res, report = _verify(artifacts, qemu10, tmp_path / "run2", "--no-device-state")
    assert res.returncode == 0, res.stdout + res.stderr
    assert report["trials"][0]["checks"]["device_state"] == {"ok": None,
                                                             "text": "device state not compared (--no-device-state)"}
    assert not list((tmp_path / "run2" / "trial-01").glob("devstate-*"))
    for args, msg in ((["--inject", "stream-device", "--no-device-state"], "cannot be combined with --no-device-state"),
                      (["--inject", "stream-device:2"], "N can only be 1")):
        bad = run_dirtylog("verify", "--artifacts", artifacts, "--qemu", qemu10, *args)
        assert bad.returncode == 2 and msg in bad.stderr.strip().splitlines()[-1], bad.stderr
        assert "Traceback" not in bad.stderr


def test_derived_state_is_allowed_with_its_reason_and_nothing_more():
    """Seen in CI: a vexpress-a15 virtual timer whose deadline passed at the stop (CNTV_CTL 0x1 on the
    source, 0x5 loaded: ISTATUS recomputed; its QEMUTimer re-armed), and q35's RTC seconds register
    brought up to the host clock by pre_save. The rules allow exactly those bits and bytes."""
    allow = devstate.load_allowlist()
    assert devstate._allowed("mc146818rtc/cmos_data", allow, b"\x49" + bytes(127), b"\x50" + bytes(127))
    assert devstate._allowed("mc146818rtc/cmos_data", allow, bytes(128), bytes(14) + b"\x01" + bytes(113)) is None
    assert devstate._allowed("cpu@1/gt_timer[1]", allow)
    idx = devstate.Field("cpu/cpreg_vmstate_indexes[201]", "uint64", (0x603000000013DF19).to_bytes(8, "big"))
    fields = {idx.path: idx}

    def val(v):
        return devstate.Field("cpu/cpreg_vmstate_values[201]", "uint64", v.to_bytes(8, "big"))
    assert "CNTV_CTL.ISTATUS" in devstate._cpreg_rule(val(1), val(5), fields)
    assert devstate._cpreg_rule(val(1), val(0), fields) is None  # ENABLE lost: a real difference
    other = {idx.path: devstate.Field(idx.path, "uint64", (0x603000000013DF1A).to_bytes(8, "big"))}
    assert devstate._cpreg_rule(val(1), val(5), other) is None  # not a timer CTL
    from verifier.capture.cpustate import compare
    result = compare({"0": {"CNTV_CTL": "01000000", "CNTP_CTL": "01000000"}},
                     {"0": {"CNTV_CTL": "05000000", "CNTP_CTL": "00000000"}}, "armv7", allowlist={})
    assert [d["register"] for d in result["differences"]] == ["CNTP_CTL"]
    assert [d["register"] for d in result["allowed"]] == ["CNTV_CTL"] and "ISTATUS" in result["allowed"][0]["reason"]
