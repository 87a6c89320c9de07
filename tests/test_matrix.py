"""Scenario matrices: parsing with positions, expansion, host fit, shards, and real matrix runs."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, qemu_processes_under, sigint_default
from verifier.errors import InputError
from verifier.matrix.fit import Host, check_fits_host
from verifier.matrix.spec import MatrixError, load_matrix, parse_shard, shard
from verifier.matrix.results import matrix_exit_code

MATRIX_CLI = [sys.executable, "-m", "dirtylog.cli_matrix"]


def _write(tmp_path, text, name="m.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _error(tmp_path, text) -> str:
    with pytest.raises(MatrixError) as exc:
        load_matrix(_write(tmp_path, text))
    return str(exc.value)


# -- parsing and expansion ------------------------------------------------------------------
def test_lists_multiply_and_names_are_deterministic(tmp_path):
    m = load_matrix(_write(tmp_path, """
[defaults]
mem = 256

[[scenario]]
name = "a"
smp = [1, 2]
machine = ["virt", "vexpress-a15"]

[[scenario]]
name = "b"
workloads = [["64:64:20"], ["64:64:20", "32:32:5"]]
max_bandwidth = "50M"
"""))
    assert [s.name for s in m.scenarios] == [
        "a[smp=1,machine=virt]", "a[smp=1,machine=vexpress-a15]",
        "a[smp=2,machine=virt]", "a[smp=2,machine=vexpress-a15]",
        "b[workloads=64:64:20]", "b[workloads=64:64:20+32:32:5]"]
    assert [s.index for s in m.scenarios] == list(range(6))
    a = m.scenarios[1].params
    assert (a["smp"], a["machine"], a["mem"], a["trials"], a["capture"]) == (1, "vexpress-a15", 256, 1, "auto")
    assert m.scenarios[5].params["workloads"] == ["64:64:20", "32:32:5"]
    assert m.scenarios[5].params["max_bandwidth"] == "50M"
    assert load_matrix(tmp_path / "m.toml").sha256 == m.sha256
    assert len({s.slug for s in m.scenarios}) == 6


def test_lists_in_defaults_multiply_every_scenario(tmp_path):
    m = load_matrix(_write(tmp_path, '[defaults]\nsmp = [1, 2]\n[[scenario]]\nname = "x"\n'
                                     '[[scenario]]\nname = "y"\nsmp = 1\n'))
    assert [s.name for s in m.scenarios] == ["x[smp=1]", "x[smp=2]", "y"]


def test_shipped_matrices_load():
    sizes = {p.name: len(load_matrix(p).scenarios) for p in (REPO / "matrices").glob("*.toml")}
    assert sizes == {"seed-2014.toml": 1, "smoke.toml": 2, "release.toml": 17}
    xfail = [s for s in load_matrix(REPO / "matrices" / "release.toml").scenarios if s.params["expect"] == "fail"]
    assert [(s.name, s.params["machine_opts"], s.params["expect_registers"]) for s in xfail] == [
        ("vexpress-secure-on", "secure=on", ["TTBR1_S", "DACR_S"])]
    seed = load_matrix(REPO / "matrices" / "seed-2014.toml").scenarios[0].params
    assert (seed["machine"], seed["smp"], seed["mem"], seed["workloads"]) == (
        "vexpress-a15", 2, 256, ["512:512:50", "512:512:50", "50:50:5"])


def test_a_shipped_matrix_by_name_from_anywhere(tmp_path, monkeypatch):
    """--matrix smoke (or smoke.toml) from a directory without such a file is the shipped one; a file
    of that name in the working directory wins; an unknown name lists the shipped ones."""
    monkeypatch.chdir(tmp_path)
    assert load_matrix("smoke").path == load_matrix("smoke.toml").path == (REPO / "matrices" / "smoke.toml")
    (tmp_path / "smoke.toml").write_text('[defaults]\nmachine = "virt"\n[[scenario]]\nname = "mine"\n')
    assert [s.name for s in load_matrix("smoke.toml").scenarios] == ["mine"]
    with pytest.raises(MatrixError) as e:
        load_matrix("nosuch")
    assert "nosuch" in str(e.value) and "smoke" in str(e.value) and "release" in str(e.value)
    with pytest.raises(MatrixError):
        load_matrix("sub/smoke.toml")  # a path is a path: never a shipped name


@pytest.mark.parametrize("text, line, words", [
    ('[[scenario]]\nname = "a"\nsmp = 1\ncolour = "red"\n', 4, ["key 'colour'", "unknown key"]),
    ('[defaults]\n\nsmp = "two"\n[[scenario]]\nname = "a"\n', 3, ["[defaults]", "key 'smp'", "integer"]),
    ('[[scenario]]\nname = "a"\n\n[[scenario]]\nname = "b"\n  machine = "pc"\n', 6,
     ["[[scenario]] #2", "key 'machine'", "vexpress-a15, virt"]),
    ('[[scenario]]\nname = "a"\nsmp = [1, 9]\n', 3, ["key 'smp'", "out of range"]),
    ('[[scenario]]\nname = "a"\nsmp = true\n', 3, ["key 'smp'", "integer"]),
    ('[[scenario]]\nname = "a"\nworkloads = ["1:2:3"]\n', 3, ["key 'workloads'", "DIRTY"]),
    ('[[scenario]]\nname = "a"\nmax_bandwidth = "fast"\n', 3, ["key 'max_bandwidth'", "byte rate"]),
    ('[[scenario]]\nname = "a"\naccel = "kvm"\n', 3, ["key 'accel'", "not supported"]),
    ('[[scenario]]\nname = "a"\ncapabilities = {multifd = true}\n', 3, ["key 'capabilities'", "not supported"]),
    ('[[scenario]]\nname = "a/b"\n', 2, ["key 'name'"]),
    ('[[scenario]]\nname = "a"\n[[scenario]]\nname = "a"\n', 4, ["already defined at", ":1"]),
    ('[[scenario]]\nsmp = 1\n', 1, ["missing key 'name'"]),
    ('[[scenario]]\nname = "a"\n[extra]\nx = 1\n', 3, ["unknown table or key 'extra'"]),
    ('title = "x"\n[[scenario]]\nname = "a"\n', 1, ["unknown table or key 'title'"]),
    ('[[scenario]]\nname = "a"\nmem = 64\nworkloads = ["8192:1:1"]\n', 4, ["key 'workloads'", "MiB"]),
    ('[[scenario]]\nname = "a"\nsmp = []\n', 3, ["empty list"]),
    ('[[scenario]]\nname = "a"\n"trials" = 0\n', 3, ["key 'trials'"]),
    ('[[scenario]]\nname = "a"\nexpect = "maybe"\n', 3, ["key 'expect'", "pass, fail"]),
    ('[[scenario]]\nname = "a"\n\nexpect_registers = ["TTBR1_S"]\n', 4,
     ["key 'expect_registers'", 'needs expect = "fail"']),
    ('[[scenario]]\nname = "a"\nexpect = "fail"\nexpect_finding = "no-such"\n', 4,
     ["key 'expect_finding'", "not a known finding", "arm-secure-cp15-banks-not-migrated"]),
    ('[[scenario]]\nname = "a"\nexpect = "fail"\nexpect_registers = []\n', 4, ["key 'expect_registers'"]),
])
def test_bad_keys_and_values_name_file_line_and_key(tmp_path, text, line, words):
    msg = _error(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'm.toml'}:{line}: "), msg
    for w in words:
        assert w in msg, msg


def test_toml_syntax_error_and_no_scenario(tmp_path):
    assert "invalid TOML" in _error(tmp_path, '[[scenario]\nname = "a"\n') and "line 1" in _error(
        tmp_path, '[[scenario]\nname = "a"\n')
    assert "no [[scenario]]" in _error(tmp_path, '[defaults]\nsmp = 1\n')


def test_artifacts_are_relative_to_the_matrix_file(tmp_path):
    (tmp_path / "sub").mkdir()
    m = load_matrix(_write(tmp_path / "sub", '[[scenario]]\nname = "a"\nartifacts = "../art"\n'))
    assert m.scenarios[0].params["artifacts"] == str((tmp_path / "art").resolve())


# -- host fit -------------------------------------------------------------------------------
def _scenarios(tmp_path, text):
    return load_matrix(_write(tmp_path, text)).scenarios


def test_a_scenario_bigger_than_the_host_is_refused(tmp_path):
    host = Host(cores=8, mem_available_mib=24 * 1024, mem_total_mib=24 * 1024, disk_free_mib=10**6)
    big = _scenarios(tmp_path, '[[scenario]]\nname = "big"\nmem = 30720\n')
    with pytest.raises(MatrixError, match=r"'big'.*needs 61840 MiB of host memory.*24576 MiB available"):
        check_fits_host(big, 1, host)
    wide = _scenarios(tmp_path, '[[scenario]]\nname = "wide"\nsmp = 8\n')
    with pytest.raises(MatrixError, match=r"needs 8 cores.*this host has 2"):
        check_fits_host(wide, 1, Host(2, 10**5, 10**5, 10**6))
    with pytest.raises(MatrixError, match="RAM images"):
        check_fits_host(_scenarios(tmp_path, '[[scenario]]\nname = "d"\n'), 1, Host(2, 10**5, 10**5, 300))


def test_jobs_are_limited_by_cores_with_a_note(tmp_path):
    sc = _scenarios(tmp_path, '[[scenario]]\nname = "s"\nsmp = 2\ntrials = [1, 2, 3]\n')
    # A running scenario takes smp + 1 cores (vCPUs and the migration).
    notes = check_fits_host(sc, 3, Host(cores=4, mem_available_mib=10**5, mem_total_mib=10**5, disk_free_mib=10**6))
    assert notes == ["--jobs 3: at most 1 scenarios fit at once on this host (4 cores, 100000 MiB available)"]
    assert check_fits_host(sc, 3, Host(9, 10**5, 10**5, 10**6)) == []
    notes = check_fits_host(sc, 3, Host(cores=8, mem_available_mib=2000, mem_total_mib=4000, disk_free_mib=10**6))
    assert notes == ["--jobs 3: at most 2 scenarios fit at once on this host (8 cores, 2000 MiB available)"]


def test_matrix_that_does_not_fit_exits_2_before_starting_anything(tmp_path):
    m = _write(tmp_path, '[[scenario]]\nname = "huge"\nmem = 1048576\n')
    res = subprocess.run([*MATRIX_CLI, "run", m, "--artifacts", tmp_path, "--run-dir", tmp_path / "run"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "needs 2097552 MiB of host memory" in res.stderr
    assert not (tmp_path / "run" / "matrix-report.json").exists()


# -- shards ---------------------------------------------------------------------------------
def _random_matrix(rng: random.Random, tmp_path: Path) -> list:
    blocks = []
    for i in range(rng.randint(1, 5)):
        lines = [f'[[scenario]]\nname = "s{i}"']
        for key, values in (("smp", ["1", "2", "3"]), ("mem", ["128", "256", "512", "1024"]),
                            ("trials", ["1", "2", "3", "5"]),
                            ("max_bandwidth", ['"auto"', '"50M"', '"10M"', "200000000"]),
                            ("machine", ['"virt"', '"vexpress-a15"'])):
            if rng.random() < 0.6:
                k = rng.randint(1, len(values))
                lines.append(f"{key} = [{', '.join(rng.sample(values, k))}]")
        blocks.append("\n".join(lines) + '\nworkloads = ["16:16:10"]\n')
    return load_matrix(_write(tmp_path, "\n".join(blocks))).scenarios


@pytest.mark.parametrize("seed", range(12))
def test_shards_partition_the_matrix_and_are_balanced(tmp_path, seed):
    rng = random.Random(seed)
    scenarios = _random_matrix(rng, tmp_path)
    for n in range(1, 9):
        parts = [shard(scenarios, i, n) for i in range(1, n + 1)]
        names = [s.name for p in parts for s in p]
        assert sorted(names) == sorted(s.name for s in scenarios), (seed, n)  # each exactly once
        assert len(names) == len(set(names))
        for p in parts:
            assert [s.index for s in p] == sorted(s.index for s in p)  # matrix order within a shard
        # Greedy longest-first: the spread is at most the most expensive scenario.
        costs = [sum(s.cost for s in p) for p in parts]
        assert max(costs) - min(costs) <= max(s.cost for s in scenarios) + 1e-6
        # Deterministic: the same file gives the same shards.
        again = load_matrix(tmp_path / "m.toml").scenarios
        assert [[s.name for s in shard(again, i, n)] for i in range(1, n + 1)] == [[s.name for s in p] for p in parts]


def test_shard_spec_parsing():
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/3", "4/3", "1/0", "x", "1-2"):
        with pytest.raises(InputError):
            parse_shard(bad)


def test_exit_code_precedence():
    assert matrix_exit_code(["pass", "pass"]) == 0
    assert matrix_exit_code(["pass", "fail"]) == 1
    assert matrix_exit_code(["fail", "error"]) == 3
    assert matrix_exit_code(["fail", "error", "interrupted"]) == 130
    assert matrix_exit_code(["pass", "not-run"]) == 130
    assert matrix_exit_code(["fail", "error", "error"], [1, 3, 4]) == 4  # a dirtylog bug outranks QEMU's
    assert matrix_exit_code(["error", "interrupted"], [4, 130]) == 130


# -- real matrix runs -------------------------------------------------------------------------
SMOKE = REPO / "matrices" / "smoke.toml"


def _run(*args, timeout=600):
    return subprocess.run([*MATRIX_CLI, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def _verdicts(report: dict) -> dict:
    return {s["name"]: (s["status"], [t["verdict"] for t in s["report"]["trials"]],
                        [t["compare"]["diff_count"] for t in s["report"]["trials"]]) for s in report["scenarios"]}


@pytest.mark.e2e
def test_shards_merged_equal_an_unsharded_run(artifacts, tmp_path):
    full = _run("run", SMOKE, "--artifacts", artifacts, "--jobs", "2", "--run-dir", tmp_path / "full",
                "--junit", tmp_path / "full.xml", "--html", tmp_path / "full.html")
    assert full.returncode == 0, full.stdout + full.stderr
    assert full.stdout.startswith("dirtylog matrix: PASS")
    # One shard after the other, as CI jobs on separate machines would: two at once on a 2-core
    # host is CPU contention the matrix scheduler avoids (see Scenario.sched_cores).
    for i in (1, 2):
        res = _run("run", SMOKE, "--artifacts", artifacts, "--shard", f"{i}/2", "--run-dir", tmp_path / f"shard{i}")
        assert res.returncode == 0, res.stdout + res.stderr
    r1 = json.loads((tmp_path / "shard1" / "matrix-report.json").read_text())
    r2 = json.loads((tmp_path / "shard2" / "matrix-report.json").read_text())
    assert len(r1["scenarios"]) == len(r2["scenarios"]) == 1
    assert r1["shard"] == {"index": 1, "count": 2}
    merged = _run("report", "merge", tmp_path / "shard1", tmp_path / "shard2", "--out", tmp_path / "merged")
    assert merged.returncode == 0, merged.stdout + merged.stderr
    m = json.loads((tmp_path / "merged" / "matrix-report.json").read_text())
    f = json.loads((tmp_path / "full" / "matrix-report.json").read_text())
    assert m["schema"] == f["schema"] == "dirtylog-matrix/1"
    assert _verdicts(m) == _verdicts(f) == {
        "smoke[transport=unix]": ("pass", ["pass"], [0]), "smoke[transport=tcp]": ("pass", ["pass"], [0])}
    assert (m["verdict"], m["exit_code"], m["missing"]) == ("pass", 0, [])
    assert [s["index"] for s in m["scenarios"]] == [0, 1]
    for d in (tmp_path / "merged", tmp_path / "full"):
        assert (d / "junit.xml").is_file()
    assert (tmp_path / "merged" / "report.html").stat().st_size > 10_000
    # Each scenario's report carries its own reproducer, and its run is in its own directory.
    sc = f["scenarios"][1]
    assert sc["report"]["command"] == sc["command"]
    assert "--transport tcp" in sc["command"] and "--smp 1" in sc["command"] and "--machine virt" in sc["command"]
    assert Path(sc["run_dir"]).parent == tmp_path / "full"
    assert (Path(sc["run_dir"]) / "report.json").is_file()
    # Only one shard: the merge says what is missing and exits 3.
    half = _run("report", "merge", tmp_path / "shard1", "--out", tmp_path / "half", "--no-html")
    assert half.returncode == 3, half.stdout + half.stderr
    assert json.loads((tmp_path / "half" / "matrix-report.json").read_text())["missing"] == [
        r2["scenarios"][0]["name"]]
    twice = _run("report", "merge", tmp_path / "shard1", tmp_path / "shard1", "--out", tmp_path / "x")
    assert twice.returncode == 2 and "in both" in twice.stderr


@pytest.mark.e2e
def test_failure_and_infrastructure_error_exit_codes_keep_the_report(artifacts, tmp_path):
    m = _write(tmp_path, """
[defaults]
machine = "virt"
smp = 1
workloads = ["64:64:20"]

[[scenario]]
name = "ok"
min_passes = 1  # Debian's 7.2 loses dirty pages in multi-pass runs (test_e2e); one pass passes

[[scenario]]
name = "no-converge"
max_bandwidth = "2M"
migration_timeout = 2
""")
    res = _run("run", m, "--artifacts", artifacts, "--jobs", "2", "--run-dir", tmp_path / "run")
    assert res.returncode == 3, res.stdout + res.stderr
    r = json.loads((tmp_path / "run" / "matrix-report.json").read_text())
    st = {s["name"]: s for s in r["scenarios"]}
    assert st["ok"]["status"] == "pass"
    assert st["no-converge"]["status"] == "error" and "did not converge" in st["no-converge"]["error"]
    assert r["exit_code"] == 3 and r["verdict"] == "error"
    assert 'type="dirtylog.infrastructure"' in (tmp_path / "run" / "junit.xml").read_text()
    assert qemu_processes_under(tmp_path) == []

    # The Secure CP15 banks bug (QEMU 7.2 and 10.0 under TCG) with secure=on.
    fail = _write(tmp_path, '[[scenario]]\nname = "vexpress"\nmachine = "vexpress-a15"\nsmp = 1\n'
                            'machine_opts = "secure=on"\nworkloads = ["64:64:20"]\n', name="fail.toml")
    res = _run("run", fail, "--artifacts", artifacts, "--run-dir", tmp_path / "fail")
    r = json.loads((tmp_path / "fail" / "matrix-report.json").read_text())
    assert res.returncode == 1, res.stdout + res.stderr
    assert r["verdict"] == "fail" and r["scenarios"][0]["status"] == "fail"
    assert "destination did not run after resuming" in (tmp_path / "fail" / "junit.xml").read_text()


@pytest.mark.e2e
def test_ctrl_c_stops_every_qemu_and_writes_the_partial_report(artifacts, tmp_path):
    m = _write(tmp_path, """
[defaults]
machine = "virt"
smp = 1
workloads = ["64:64:20"]
max_bandwidth = "2M"

[[scenario]]
name = "slow"
transport = ["unix", "tcp"]

[[scenario]]
name = "later"
""")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*MATRIX_CLI, "run", str(m), "--artifacts", str(artifacts), "--jobs", "2",
                             "--run-dir", str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=sigint_default)
    deadline = time.monotonic() + 120
    while not list(run_dir.glob("*/trial-01/timeline.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(1)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, out + err
    assert time.monotonic() - t0 < 40
    assert qemu_processes_under(tmp_path) == []
    r = json.loads((run_dir / "matrix-report.json").read_text())
    assert r["exit_code"] == 130 and r["verdict"] == "interrupted"
    st = {s["name"]: s["status"] for s in r["scenarios"]}
    assert st["later"] == "not-run"
    assert "interrupted" in {st["slow[transport=unix]"], st["slow[transport=tcp]"]}
    started = [s for s in r["scenarios"] if s["status"] == "interrupted"]
    assert all(s["report"] and s["report"]["verdict"] == "interrupted" for s in started)
    assert "interrupted" in err


def test_scenarios_are_checked_against_their_artifacts_before_anything_starts(artifacts, tmp_path):
    m = _write(tmp_path, '[[scenario]]\nname = "ok"\nmachine = "virt"\n\n'
                         '[[scenario]]\nname = "pc"\nmachine = "q35"\nsmp = 1\n')
    res = _run("run", m, "--artifacts", artifacts, "--run-dir", tmp_path / "run", timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"scenario 'pc' ({m}:5): machine q35 runs x86_64 guests; the artifacts in" in res.stderr
    assert not list((tmp_path / "run").glob("*/trial-01")) if (tmp_path / "run").exists() else True
    m2 = _write(tmp_path, '[[scenario]]\nname = "a"\nqemu = "/nonexistent/qemu-system-arm"\n', name="q.toml")
    res = _run("run", m2, "--artifacts", artifacts, "--run-dir", tmp_path / "run2", timeout=120)
    assert res.returncode == 2 and "scenario 'a'" in res.stderr, res.stderr
    # what a host cannot do: the same refusal, in the same words, as `dirtylog verify --dst-host` gives
    m3 = _write(tmp_path, '[[scenario]]\nname = "far"\ncapture = "backing-file"\ndst_host = "tester@192.0.2.7"\n'
                          'migration_address = "192.0.2.7"\n', name="far.toml")
    res = _run("run", m3, "--artifacts", artifacts, "--run-dir", tmp_path / "run3", timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "scenario 'far'" in res.stderr and "--capture backing-file: the source runs on localhost under" in res.stderr


@pytest.mark.e2e
def test_release_matrix_pins_the_secure_cp15_bug_as_an_expected_failure(artifacts, tmp_path):
    """The shipped release matrix's expected-FAIL scenario, run alone with --scenario: it fails
    as expected (exit 0), and its reports name the Secure banks that arrive as zero."""
    from conftest import run_dirtylog
    release = REPO / "matrices" / "release.toml"
    typo = run_dirtylog("verify", "--matrix", release, "--scenario", "vexpress-secure-of", "--artifacts", artifacts,
                        "--run-dir", tmp_path / "typo")
    assert typo.returncode == 2 and "matches no scenario" in typo.stderr and "Traceback" not in typo.stderr
    assert not (tmp_path / "typo").exists()
    res = run_dirtylog("verify", "--matrix", release, "--scenario", "vexpress-secure-*", "--artifacts", artifacts,
                       "--run-dir", tmp_path / "run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "EXPECTED-FAIL" in res.stdout and "1 failed as expected" in res.stdout
    r = json.loads((tmp_path / "run" / "matrix-report.json").read_text())
    assert r["verdict"] == "pass" and r["selected"] == ["vexpress-secure-*"]
    (sc,) = r["scenarios"]
    assert sc["status"] == "expected-fail" and "TTBR1_S" in sc["expectation"] and "DACR_S" in sc["expectation"]
    (t,) = sc["report"]["trials"]
    assert t["verdict"] == "fail" and {"TTBR1_S", "DACR_S"} <= {d["register"] for d in t["cpu_state"]["differences"]}
    first = (Path(sc["run_dir"]) / "report.txt").read_text().splitlines()[0]
    assert "CPU state" in first and "TTBR1_S" in first, first
    junit_xml = (tmp_path / "run" / "junit.xml").read_text()
    assert 'type="dirtylog.expected-fail"' in junit_xml and "arm-secure-cp15-banks-not-migrated" in junit_xml
    assert qemu_processes_under(tmp_path) == []
