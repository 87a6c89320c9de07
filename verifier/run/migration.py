"""Driving one precopy migration from start to convergence, as the 2014 procedure did by hand.

Policy: a migration that completes in a single pass tests nothing. So, unless the user fixed the
bandwidth, the source is first held at a low bandwidth and a 1 ms downtime limit until the dirty
bitmap has been synced `min_passes` times while the workload keeps writing; then the bandwidth is
released and the downtime limit raised step by step (the seed's `migrate_set_downtime`) until the
migration converges, under a hard timeout.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

from verifier.errors import InputError, MigrationError, QemuError
from verifier.run.qemu import QemuProcess

MiB = 1024 * 1024
UNLIMITED_BANDWIDTH = 100 * 1024 * MiB  # bytes/s; far above what a local migration reaches
DOWNTIME_STEPS_MS = (50, 100, 200, 400, 800, 1600, 3200, 6400, 12800)


@dataclass
class MigrationPolicy:
    max_bandwidth: int | None = None  # bytes/s fixed by the user; None = throttle, then release
    throttle_bandwidth: int = 50 * 1000 * 1000
    min_passes: int = 4
    timeout_s: float = 180.0
    poll_interval_s: float = 0.1
    capabilities: dict[str, bool] = field(default_factory=dict)
    parameters: dict[str, object] = field(default_factory=dict)
    postcopy: bool = False  # switch to postcopy once the forced passes are done
    before_switchover: Callable[[], None] | None = None  # runs while the source is paused there


@dataclass
class MigrationResult:
    figures: dict
    samples: int
    parameter_changes: list[dict]
    warnings: list[str]


def _ram(info: dict) -> dict:
    return info.get("ram") or {}


# parameters query-migrate-parameters reports only once they have been set
_UNREPORTED_PARAMETERS = {"block-bitmap-mapping"}


def check_supported(side: QemuProcess, policy: MigrationPolicy) -> None:
    """Refuse, before the guest boots, a capability or parameter this QEMU does not have: the
    user's input (or their QEMU's age) is wrong, nothing failed. Asked of the QEMU itself."""
    wanted = set(policy.capabilities) | ({"postcopy-ram"} if policy.postcopy else set())
    if wanted:
        have = {c["capability"] for c in side.qmp("query-migrate-capabilities")}
        missing = sorted(wanted - have)
        if missing:
            raise InputError(f"this QEMU ({side.binary.version_str}) has no migration capability "
                             f"{', '.join(missing)}; it has: {', '.join(sorted(have))}")
    if policy.parameters:
        have = set(side.qmp("query-migrate-parameters")) | _UNREPORTED_PARAMETERS
        missing = sorted(set(policy.parameters) - have)
        if missing:
            raise InputError(f"this QEMU ({side.binary.version_str}) has no migration parameter "
                             f"{', '.join(missing)}; it has: {', '.join(sorted(have))}")


# Parameters the destination must share: it accepts exactly multifd-channels connections (QEMU 7.2
# refuses more, so the source's writes fail; 10.0 waits in setup for ever) and decodes with the
# source's multifd compression.
BOTH_SIDES_PARAMETERS = ("multifd-channels", "multifd-compression")


def configure(src: QemuProcess, dst: QemuProcess, policy: MigrationPolicy) -> None:
    """Capabilities must match on both sides; parameters matter on the source, and the multifd
    ones (BOTH_SIDES_PARAMETERS) on the destination too."""
    both = dict(policy.capabilities)
    if policy.postcopy:
        both["postcopy-ram"] = True
    if both:
        caps = [{"capability": k, "state": v} for k, v in both.items()]
        for side in (src, dst):
            side.qmp("migrate-set-capabilities", capabilities=caps)
    if policy.before_switchover is not None:
        src.qmp("migrate-set-capabilities",
                capabilities=[{"capability": "pause-before-switchover", "state": True}])
    if "events" not in policy.capabilities:
        # MIGRATION_PASS at every dirty-bitmap sync, timestamped by QEMU: which pass sent which page
        # (verifier.analysis.provenance.sync_table); the stream is the same with or without it
        src.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    if policy.parameters:
        src.qmp("migrate-set-parameters", **policy.parameters)
        shared = {k: v for k, v in policy.parameters.items() if k in BOTH_SIDES_PARAMETERS}
        if shared:
            dst.qmp("migrate-set-parameters", **shared)


def start_incoming(src: QemuProcess, dst: QemuProcess, uri: str, policy: MigrationPolicy) -> None:
    """Set capabilities and parameters, then let the destination listen: QEMU 10 refuses some
    capabilities (multifd) on a destination whose incoming migration has already started."""
    configure(src, dst, policy)
    dst.qmp("migrate-incoming", uri=uri)


def run_migration(src: QemuProcess, dst: QemuProcess, uri: str, policy: MigrationPolicy,
                  timeline_path: Path, progress=None) -> MigrationResult:
    """Migrate src to dst (already listening on `uri` through start_incoming) and return the
    migration's figures.

    On return the source is `postmigrate` and the destination `paused`, neither has resumed.
    `progress`, when given, is called with each query-migrate sample.
    """
    changes: list[dict] = []
    t0 = time.monotonic()

    def set_params(**params) -> None:
        src.qmp("migrate-set-parameters", **params)
        changes.append({"t": round(time.monotonic() - t0, 3), **params})

    forcing = policy.min_passes > 1 or policy.postcopy
    postcopy_started = False
    if policy.max_bandwidth is not None:
        set_params(**{"max-bandwidth": policy.max_bandwidth})
    elif forcing:
        set_params(**{"max-bandwidth": policy.throttle_bandwidth})
    else:
        set_params(**{"max-bandwidth": UNLIMITED_BANDWIDTH})
    if forcing:
        set_params(**{"downtime-limit": 1})
    step = 0
    steps_at_sync: int | None = None
    samples = 0
    peak_dirty_rate = 0
    src.qmp("migrate", uri=uri)
    with open(timeline_path, "w") as timeline:
        while True:
            sent = time.time()
            info = src.qmp("query-migrate")
            answered = time.time()
            now = time.monotonic() - t0
            status = info.get("status", "none")
            ram = _ram(info)
            sync = ram.get("dirty-sync-count", 0)
            peak_dirty_rate = max(peak_dirty_rate, ram.get("dirty-pages-rate", 0))
            sample = {"t": round(now, 3), "status": status, "ram": ram,
                      "expected-downtime": info.get("expected-downtime"),
                      "wall": [round(sent, 6), round(answered, 6)]}  # time.time() around the query
            passes = _passes(src)
            if passes:
                sample["passes"] = passes
            for key in ("xbzrle-cache", "cpu-throttle-percentage", "dirty-limit-throttle-time-per-round"):
                if key in info:
                    sample[key] = info[key]
            timeline.write(json.dumps(sample) + "\n")
            samples += 1
            if progress is not None:
                progress(info)
            if status == "completed":
                break
            if status == "pre-switchover":
                policy.before_switchover()
                src.qmp("migrate-continue", state="pre-switchover")
            if status in ("failed", "cancelled"):
                raise MigrationError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            if not dst.alive():
                raise MigrationError(f"destination QEMU died during the migration: {dst.output_tail()}")
            if policy.postcopy and not postcopy_started and status == "active" and sync >= policy.min_passes:
                # The bandwidth stays throttled: released, precopy would finish before switching.
                postcopy_started = True
                forcing = False
                src.qmp("migrate-start-postcopy")
                changes.append({"t": round(now, 3), "postcopy": "started"})
            elif forcing and sync >= policy.min_passes:
                forcing = False
                if policy.max_bandwidth is None:
                    set_params(**{"max-bandwidth": UNLIMITED_BANDWIDTH})
                set_params(**{"downtime-limit": DOWNTIME_STEPS_MS[0]})
                steps_at_sync = sync
            elif (not forcing and steps_at_sync is not None and sync > steps_at_sync
                  and step + 1 < len(DOWNTIME_STEPS_MS)):
                # One more pass did not converge: allow a longer stop, as the seed did by hand.
                step += 1
                steps_at_sync = sync
                set_params(**{"downtime-limit": DOWNTIME_STEPS_MS[step]})
            if now > policy.timeout_s:
                try:
                    src.qmp("migrate_cancel")
                except QemuError:
                    pass
                raise MigrationError(
                    f"migration did not converge within {policy.timeout_s:.0f} s: {sync} dirty syncs, "
                    f"{ram.get('remaining', '?')} bytes remaining, dirty rate "
                    f"{ram.get('dirty-pages-rate', '?')} pages/s (raise --max-bandwidth or lower the workload)")
            time.sleep(policy.poll_interval_s)
    _wait_status(src, ("postmigrate",), 30)
    _wait_status(dst, ("paused",), 30)
    ram = _ram(info)
    figures = {
        "status": info.get("status"),
        "total_time_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "setup_time_ms": info.get("setup-time"),
        "dirty_sync_count": ram.get("dirty-sync-count"),
        "transferred_bytes": ram.get("transferred"),
        "ram_total_bytes": ram.get("total"),
        "normal_pages": ram.get("normal"),
        "duplicate_pages": ram.get("duplicate"),
        "mbps": ram.get("mbps"),
        "peak_dirty_pages_rate": peak_dirty_rate,
        "final_downtime_limit_ms": DOWNTIME_STEPS_MS[step] if steps_at_sync is not None else None,
    }
    warnings = []
    if policy.postcopy and not any(c.get("postcopy") for c in changes):
        warnings.append("postcopy was asked for but the migration completed before it could switch")
    if (ram.get("dirty-sync-count") or 0) <= 2:
        warnings.append(
            f"the migration completed after {ram.get('dirty-sync-count')} dirty-bitmap syncs: a "
            "single pass while the workload ran tests little (use --min-passes or lower --max-bandwidth)")
    return MigrationResult(figures=figures, samples=samples, parameter_changes=changes, warnings=warnings)


def _passes(src) -> list[dict]:
    """The MIGRATION_PASS events received since the last sample: each sync's number and QEMU's
    timestamp of it (time.time()'s clock); nothing from a source object without QMP events."""
    take = getattr(src, "take_events", None)
    if take is None:
        return []
    out = []
    for ev in take("MIGRATION_PASS"):
        ts = ev.get("timestamp") or {}
        data = ev.get("data") or {}
        if "pass" in data and "seconds" in ts:
            out.append({"pass": data["pass"], "time": ts["seconds"] + ts.get("microseconds", 0) / 1e6})
    return out


def _wait_status(proc: QemuProcess, wanted: tuple[str, ...], timeout: float) -> str:
    """`completed` may arrive while the source is still in finish-migrate: wait for the state."""
    deadline = time.monotonic() + timeout
    while True:
        status = proc.status()
        if status in wanted:
            return status
        if time.monotonic() > deadline:
            raise MigrationError(f"{proc.name} QEMU stayed '{status}' instead of reaching {'/'.join(wanted)}")
        time.sleep(0.05)
