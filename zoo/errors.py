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


def failure_text(error: BaseException) -> str:
    """One line for what a plugin (or any code zoo did not write) raised: a ZooError's own
    message, anything else as ``Type: first line`` so the reader knows what broke."""
    if isinstance(error, ZooError):
        return str(error)
    message = error_reason(error) if str(error).strip() else ""
    return f"{type(error).__name__}: {message}".rstrip(": ")
