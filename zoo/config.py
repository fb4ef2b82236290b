"""Settings built from options where None means "not given"."""

from __future__ import annotations

from typing import Any, TypeVar

S = TypeVar("S")


def with_overrides(cls: type[S], **values: Any) -> S:
    """``cls(**values)`` without the None values, so an option left unset takes the
    dataclass's own default (written in one place), or with ``dict`` leaves a value set
    elsewhere, such as ``-o beta=2``, alone."""
    return cls(**{name: value for name, value in values.items() if value is not None})
