"""Pure decisions, without a guest: the migration policy's parameter changes (driven by scripted
QMP answers in place of a QEMU: no QEMU process runs in this file) and ssh failure classification."""

from __future__ import annotations

import pytest

from verifier.errors import MigrationError
from verifier.run.migration import DOWNTIME_STEPS_MS, UNLIMITED_BANDWIDTH, MigrationPolicy, run_migration
from verifier.run.hosts import HostAuthError, HostKeyError, HostUnreachable, classify_ssh_failure


class ScriptedQmp:
    """Answers query-migrate from a script of (status, dirty-sync-count); records every command."""

    name = "src"

    def __init__(self, script):
        self.script = list(script)
        self.sent = []

    def qmp(self, cmd, **args):
        self.sent.append((cmd, args))
        if cmd == "query-migrate":
            status, sync = self.script.pop(0) if len(self.script) > 1 else self.script[0]
            return {"status": status, "ram": {"dirty-sync-count": sync, "remaining": 0}}
        return {}

    def status(self):
        return "postmigrate" if self.name == "src" else "paused"

    def alive(self):
        return True

    def output_tail(self):
        return ""


def _migrate(tmp_path, policy, script):
    src, dst = ScriptedQmp(script), ScriptedQmp([("none", 0)])
    dst.name = "dst"
    policy.poll_interval_s = 0
    result = run_migration(src, dst, "unix:x", policy, tmp_path / "timeline.jsonl")
    return result, [a for c, a in src.sent if c == "migrate-set-parameters"]


def test_throttled_until_the_forced_passes_then_released_then_longer_stops(tmp_path):
    script = [("active", 1), ("active", 2), ("active", 4), ("active", 5), ("active", 6), ("completed", 6)]
    result, params = _migrate(tmp_path, MigrationPolicy(min_passes=4), script)
    assert params == [{"max-bandwidth": 50_000_000}, {"downtime-limit": 1},
                      {"max-bandwidth": UNLIMITED_BANDWIDTH}, {"downtime-limit": DOWNTIME_STEPS_MS[0]},
                      {"downtime-limit": DOWNTIME_STEPS_MS[1]}, {"downtime-limit": DOWNTIME_STEPS_MS[2]}]
    assert result.figures["final_downtime_limit_ms"] == DOWNTIME_STEPS_MS[2]
    assert result.warnings == []


def test_a_fixed_bandwidth_is_never_released(tmp_path):
    script = [("active", 1), ("active", 4), ("completed", 4)]
    _, params = _migrate(tmp_path, MigrationPolicy(min_passes=4, max_bandwidth=2_000_000), script)
    assert {"max-bandwidth": UNLIMITED_BANDWIDTH} not in params
    assert params[0] == {"max-bandwidth": 2_000_000}


def test_one_pass_runs_unthrottled_and_is_warned_about(tmp_path):
    result, params = _migrate(tmp_path, MigrationPolicy(min_passes=1), [("active", 1), ("completed", 2)])
    assert params == [{"max-bandwidth": UNLIMITED_BANDWIDTH}]
    assert "tests little" in result.warnings[0]


def test_a_failed_migration_is_a_migration_error_with_qemus_reason(tmp_path):
    with pytest.raises(MigrationError, match="migration failed: socket closed"):
        src, dst = ScriptedQmp([("active", 1)]), ScriptedQmp([("none", 0)])
        src.qmp = lambda cmd, **a: ({"status": "failed", "error-desc": "socket closed"} if cmd == "query-migrate"
                                    else {})
        run_migration(src, dst, "unix:x", MigrationPolicy(poll_interval_s=0), tmp_path / "t.jsonl")


def test_no_convergence_cancels_and_says_what_to_change(tmp_path):
    src, dst = ScriptedQmp([("active", 3)]), ScriptedQmp([("none", 0)])
    with pytest.raises(MigrationError, match="did not converge within 0 s.*raise --max-bandwidth"):
        run_migration(src, dst, "unix:x", MigrationPolicy(timeout_s=0, poll_interval_s=0), tmp_path / "t.jsonl")
    assert ("migrate_cancel", {}) in src.sent


@pytest.mark.parametrize("stderr, kind, words", [
    ("Host key verification failed.", HostKeyError, "host key unknown or changed"),
    ("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@", HostKeyError, "host key"),
    ("root@h: Permission denied (publickey).", HostAuthError, "authentication failed"),
    ("ssh: Could not resolve hostname nohost: Name or service not known", HostUnreachable, "cannot resolve"),
    ("ssh: connect to host 10.0.0.9 port 22: Connection refused", HostUnreachable, "unreachable: connection refused"),
    ("ssh: connect to host 10.0.0.9 port 22: Connection timed out", HostUnreachable, "connection timed out"),
    ("something new", HostUnreachable, "ssh failed (connect): something new"),
])
def test_ssh_failures_are_classified_into_one_typed_line(stderr, kind, words):
    err = classify_ssh_failure("h", stderr, "connect")
    assert type(err) is kind and words in str(err) and "\n" not in str(err)
    assert err.exit_code == 3


def test_multifd_parameters_reach_the_destination_too():
    """The destination accepts exactly multifd-channels connections: set on the source alone, 7.2's
    destination refuses the extra ones (Broken pipe) and 10.0's waits in setup for ever."""
    from verifier.run.migration import configure
    src, dst = ScriptedQmp([("none", 0)]), ScriptedQmp([("none", 0)])
    policy = MigrationPolicy(capabilities={"multifd": True},
                             parameters={"multifd-channels": 4, "xbzrle-cache-size": 64 << 20})
    configure(src, dst, policy)
    assert ("migrate-set-parameters", {"multifd-channels": 4, "xbzrle-cache-size": 64 << 20}) in src.sent
    assert ("migrate-set-parameters", {"multifd-channels": 4}) in dst.sent
