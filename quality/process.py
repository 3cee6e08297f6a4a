"""Validation in a child process started ahead of need.

Importing the suites' libraries (Great Expectations, with pandas, scipy and
altair: 5-7 s of CPU here) is most of the time it takes to validate a small
release. A run that will validate starts this child first thing, at a lower CPU
priority, so the imports overlap with the shards' work instead of following it
(or blocking the flow's loop while they run); once the release is staged it asks
the child to validate it. One release per child. The command line starts it
even before the flow (`start_ahead`), as its own start-up leaves cores idle.

Protocol: one JSON request line on the child's stdin; JSON lines back on its
stdout: {"log": line} any number of times, then {"verdict": {...}} or {"error":
traceback} (with the errno of an OSError, or the class of a DuckDB error, so that
the caller raises what it would have met in its own process). Anything else the
libraries print goes to the child's stderr. A child that cannot answer (it died,
or never started) raises `ChildUnavailable`, and the caller validates in its own
process instead.

    python -m facecap.quality.process NICE     # the child (started by ValidationProcess)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from typing import Any, Callable


class ChildUnavailable(RuntimeError):
    """The validation child could not take the request: validate in this process instead."""


class ValidationFailed(RuntimeError):
    """Validation itself raised in the child; the message holds its traceback."""


class ValidationProcess:
    """A started child that imports the suites now and validates one release when asked."""

    def __init__(self, nice: int = 10) -> None:
        self.errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty library never blocks on it
        self.proc = subprocess.Popen([sys.executable, "-m", "facecap.quality.process", str(nice)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True)

    def validate(self, release_dir: str, overrides: list[str] | None, allow_failures: bool,
                 log: Callable[[str], None]) -> dict[str, Any]:
        request = {"release_dir": release_dir, "overrides": overrides, "allow_failures": allow_failures}
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise ChildUnavailable(self._exited(f"it did not take the request ({exc})")) from None
        for line in self.proc.stdout:
            message = json.loads(line)
            if "log" in message:
                log(message["log"])
            elif "verdict" in message:
                return message["verdict"]
            elif "error" in message:
                raise _rebuilt(message, release_dir)
        raise ChildUnavailable(self._exited("it ended without a verdict"))

    def _exited(self, what: str) -> str:
        code = self.proc.wait()
        self.errors.seek(0)
        tail = self.errors.read().decode(errors="replace")[-1500:].strip()
        return f"the validation process {what}; exit code {code}" + (f":\n{tail}" if tail else "")

    def close(self) -> None:
        """Stop the child (if it still runs: a run that did not validate never asked it)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except (BrokenPipeError, OSError):
                pass
        self.errors.close()


def _rebuilt(message: dict, release_dir: str) -> Exception:
    """The child's exception as the flow would have met it in its own process: an OSError (a full disk, say)
    or a DuckDB error stays one, so the flow reports it as it would; anything else is ValidationFailed. The
    child's traceback rides along as a note."""
    exc: Exception | None = None
    if message.get("os_error"):
        code, text, filename = message["os_error"]
        exc = OSError(code, text, filename) if filename else OSError(code, text)
    elif message.get("duckdb"):
        import duckdb

        cls = getattr(duckdb, message["duckdb"][0], None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            exc = cls(message["duckdb"][1])
    if exc is None:
        return ValidationFailed(f"validating {release_dir} failed:\n{message['error']}")
    exc.add_note(f"raised in the validation process:\n{message['error']}")
    return exc


# Started ahead of need in this process (`start_ahead`); the next validation takes it (`take_ahead`).
_ahead: list[ValidationProcess] = []
_imported_here: list[bool] = []


def validate_in_this_process() -> None:
    """This process has imported the suites' libraries already (a warm process, facecap/warm_process.py): a
    child would only import them again, so none is started and validation runs here."""
    _imported_here.append(True)


def start_ahead() -> ValidationProcess | None:
    """The validation process waiting in this process, started now if there is none (and none is needed)."""
    if not _ahead and not _imported_here:
        _ahead.append(ValidationProcess())
    return _ahead[0] if _ahead else None


def take_ahead() -> ValidationProcess | None:
    """The waiting validation process, for one validation (the taker closes it); None if there is none."""
    return _ahead.pop() if _ahead else None


def stop_ahead() -> None:
    """Stop a validation process nobody took (the run failed, or its release stands unchanged)."""
    while _ahead:
        _ahead.pop().close()


def _serve(nice: int) -> int:
    """The child: import now, then validate the one release asked for on stdin."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, never into the protocol
    os.nice(nice)

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")

    import great_expectations  # noqa: F401 (the point of starting early)

    from facecap.quality.validate import validate_release

    line = sys.stdin.readline()
    if not line:  # the run ended without validating
        return 0
    request = json.loads(line)
    try:
        verdict = validate_release(request["release_dir"], request["overrides"], request["allow_failures"],
                                   log=lambda text: send({"log": text}))
    except Exception as exc:
        message: dict[str, Any] = {"error": traceback.format_exc()}
        if isinstance(exc, OSError):
            message["os_error"] = [exc.errno, exc.strerror, exc.filename]
        elif type(exc).__module__.split(".")[0] in ("duckdb", "_duckdb"):
            message["duckdb"] = [type(exc).__name__, str(exc)]
        send(message)
        return 1
    send({"verdict": verdict})
    return 0


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
