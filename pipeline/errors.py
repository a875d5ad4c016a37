"""The one base of every error the project reports in one line.

Each module raises its own subclass (a missing dataset, a bad study file, a storage that cannot be
opened, ...) with a message that names the problem and the fix; the command line catches
``PipelineError`` alone and prints that message, so a new kind of error needs no change there.
Anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A failure the user can fix; its message says what went wrong and how to fix it."""
