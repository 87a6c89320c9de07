"""Typed errors of the verifier. Only the CLI turns them into exit codes."""


class VerifyError(Exception):
    """Base class; an infrastructure failure unless a subclass says otherwise."""

    exit_code = 3


class InputError(VerifyError):
    """Bad user input: a missing or wrong artifact, a malformed option, a QEMU that is too old."""

    exit_code = 2


class QemuError(VerifyError):
    """A QEMU process failed to start, crashed or stopped answering.

    Besides the one-line message: `cmdline` (the argv, when a process was started), `exit_status`
    (its exit code, None while it runs or when it never started) and `output_tail` (the last lines
    it wrote), for a caller or a report that wants them without parsing the message.
    """

    def __init__(self, message: str, *, cmdline: list[str] | None = None, exit_status: int | None = None,
                 output_tail: str = ""):
        super().__init__(message)
        self.cmdline = list(cmdline) if cmdline else None
        self.exit_status = exit_status
        self.output_tail = output_tail


class MigrationError(VerifyError):
    """The migration failed or did not converge in time."""


class CaptureError(VerifyError):
    """Guest RAM could not be captured, or the capture is inconsistent."""
