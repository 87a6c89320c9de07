"""What every dirtylog command shares: exit codes, progress lines, and the one place where
exceptions become exit codes (`run_main`).

Exit codes: 0 pass, 1 verification found differences, 2 usage or input error, 3 infrastructure
failure (QEMU crashed, migration failed, download failed), 4 internal error (a bug in dirtylog),
130 interrupted.
"""

from __future__ import annotations

import signal
import sys

import click

from builder.errors import BuildError
from verifier.errors import VerifyError

EXIT_PASS, EXIT_DIFFERENCES, EXIT_USAGE, EXIT_INFRA, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class Console:
    """Progress lines on stderr: plain in CI logs, nothing with --quiet."""

    def __init__(self, quiet: bool = False, verbose: bool = False):
        self.quiet = quiet
        self.verbose = verbose
        self._last_sync = None

    def step(self, msg: str) -> None:
        if not self.quiet:
            click.echo(f"dirtylog: {msg}", err=True)

    def detail(self, msg: str) -> None:
        if self.verbose and not self.quiet:
            click.echo(f"dirtylog: {msg}", err=True)

    def migration(self, info: dict) -> None:
        ram = info.get("ram") or {}
        sync = ram.get("dirty-sync-count")
        if self.quiet or sync == self._last_sync:
            return
        self._last_sync = sync
        click.echo(f"dirtylog:   {info.get('status')}: dirty sync {sync}, "
                   f"{ram.get('remaining', 0) / 1e6:.1f} MB remaining, "
                   f"{ram.get('transferred', 0) / 1e6:.1f} MB sent, "
                   f"dirty rate {ram.get('dirty-pages-rate', 0)} pages/s", err=True)


def fail(message: str, code: int) -> None:
    """One line on stderr, then exit `code`."""
    click.echo(f"dirtylog: error: {message}", err=True)
    sys.exit(code)


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def run_main(group: click.Group, argv=None) -> None:
    """Run a click group; the only place where exceptions become exit codes."""
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        group.main(args=argv, prog_name="dirtylog", standalone_mode=False)
    except click.exceptions.Abort:
        fail("interrupted", EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        fail("interrupted; every QEMU was stopped", EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except (BuildError, VerifyError) as exc:
        fail(str(exc), exc.exit_code)
    except OSError as exc:
        fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), EXIT_INFRA)
    except Exception as exc:  # a bug of dirtylog's own: the traceback is for the report
        internal_error(exc)
    sys.exit(EXIT_PASS)


def internal_error(exc: BaseException) -> None:
    """Exit 4: the traceback, then one line saying it is dirtylog's bug and what to send."""
    import traceback
    traceback.print_exception(exc)
    fail(f"internal error: {type(exc).__name__}: {exc} (a bug in dirtylog {version()}; please report it "
         f"with the traceback above and the run directory)", EXIT_INTERNAL)


def version() -> str:
    """'0.1.0 (git 1a2b3c4d5e6f)' from a checkout, '0.1.0 (installed)' from a wheel."""
    from builder.project import describe
    return describe()
