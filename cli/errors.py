"""The one place where errors become a one-line message and an exit code."""

from __future__ import annotations

import sys

import click

from w2w.errors import W2WError

# exit codes: 0 ok, 1 an error w2wreg explains, 2 a usage error (click's), 3 an integrity problem
EXIT_ERROR, EXIT_USAGE, EXIT_INTEGRITY = 1, 2, 3


def fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class ErrorHandlingGroup(click.Group):
    """Turns library errors into `error: ...` on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except W2WError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted; nothing half-written was kept", 130)
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            fail(f"{where}{e.strerror or e}")
