"""The one base of every error the project reports in one line.

Each module raises its own subclass (a missing dataset, a bad study file, a storage that cannot be
opened, ...) with a message that names the problem and the fix; the command line prints that
message for any ``PipelineError`` (exit 1; ConfigError, a bad command-line value, exits 2), so a
new kind of error needs no change there. Anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A failure the user can fix; its message says what went wrong and how to fix it."""


def first_line(error) -> str:
    """An error's first line (at most 300 characters), or its type's name when it has no text: how a
    library's error is quoted inside one of ours."""
    text = str(error).strip()
    return text.splitlines()[0].strip()[:300] if text else type(error).__name__
