"""The one exception type a user ever sees.

Every expected failure (bad data, unknown model, foreign checkpoint) is raised
as a `ZooError` whose message is a single line saying what is wrong and what to
do. The CLI prints it and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class ZooError(Exception):
    """A user-facing error: one line, says what is wrong and what to do."""


def error_reason(error: BaseException) -> str:
    """The first line of a library's exception (or its type name), to quote inside a ZooError."""
    text = str(error)
    return text.splitlines()[0] if text.strip() else type(error).__name__
