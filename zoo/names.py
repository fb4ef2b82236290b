"""Names that come from files, checked where they are read and escaped where they are shown.

Attribute names, run folders, checkpoint paths, plugin and distribution names all come from
files a user did not necessarily write. An attribute name becomes a file name (a concept
vector is ``concepts/NAME.safetensors``), so it must be a plain name; any name may reach the
terminal, a Markdown card or its YAML header, so each of those gets text that cannot change
its structure: no rich markup or terminal control codes, no Markdown section or table, and
YAML that reads back as exactly the string written.
"""

from __future__ import annotations

import re
import unicodedata

from zoo.errors import ZooError

PLAIN_NAME = re.compile(r"[^\W][\w.+-]{0,99}")
"""A name that can be part of a file name: letters, digits and ``_ . + -``, starting with a
letter, digit or underscore, at most 100 characters (CelebA's longest attribute has 19). No
``/``, no leading dot."""
PLAIN_RULE = "letters, digits and _ . + -, starting with a letter, digit or _"

# PEP 508 distribution names and the versions pip writes into METADATA (PEP 440, normalised)
DISTRIBUTION_NAME = re.compile(r"[A-Z0-9]([A-Z0-9._-]*[A-Z0-9])?", re.IGNORECASE)
ENTRY_POINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  # module.path:object.attribute
VERSION = re.compile(
    r"(\d+!)?\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9]+(\.[a-z0-9]+)*)?",
    re.IGNORECASE,
)

# bidirectional overrides and isolates: they reorder the text around them on screen
BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
HIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})  # controls, lone surrogates, line breaks


def is_plain_name(name: object) -> bool:
    return isinstance(name, str) and bool(PLAIN_NAME.fullmatch(name))


def check_attribute_names(names: list[str], where: str, advice: str) -> list[str]:
    """``names`` if every one is a plain name (`PLAIN_NAME`), else a one-line ZooError
    naming ``where`` they were read ("FILE line 2"), the first bad one and ``advice``."""
    for name in names:
        if not is_plain_name(name):
            raise ZooError(
                f"{where}: attribute name {printable(str(name))!r} is not a plain name "
                f"({PLAIN_RULE}); {advice}"
            )
    return names


def is_distribution_name(name: str) -> bool:
    return bool(DISTRIBUTION_NAME.fullmatch(name))


def is_entry_point(text: str) -> bool:
    return bool(ENTRY_POINT.fullmatch(text))


def is_version(version: str) -> bool:
    return bool(VERSION.fullmatch(version))


SHORT_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(character: str) -> str:
    code = ord(character)
    if character in SHORT_ESCAPES:
        return SHORT_ESCAPES[character]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every character that is not shown as itself written as an escape
    (``\\n``, ``\\x1b``, ``\\u202e``, a lone surrogate as ``\\udcff``): one line that cannot
    move the cursor, restyle the terminal or reorder what is around it."""
    shown = []
    for character in text:
        hidden = unicodedata.category(character) in HIDDEN_CATEGORIES
        if hidden or character in BIDI_CONTROLS:
            shown.append(_escape(character))
        else:
            shown.append(character)
    return "".join(shown)


MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]<>&|~])")  # what opens structure inside a line


def markdown_text(text: str) -> str:
    """``text`` as Markdown prose inside a line (after other text, as zoo's cards place it)
    that renders as exactly these characters: no emphasis, link, HTML, code or table cell."""
    return MARKDOWN_INLINE.sub(r"\\\1", printable(text))


def markdown_code(text: str) -> str:
    """``text`` as an inline code span on one line, whatever backticks it holds; pipes are
    escaped so the span can also sit in a table cell."""
    shown = printable(text)
    if not shown:
        return "(empty)"
    fence = "`" * (max((len(run) for run in re.findall(r"`+", shown)), default=0) + 1)
    padded = f" {shown} " if shown[0] in "` " or shown[-1] in "` " else shown
    return f"{fence}{padded}{fence}".replace("|", "\\|")


def code_fence(body: str) -> str:
    """A fence for a code block holding ``body``: longer than any backtick run in it, so no
    line of the body can close the block."""
    return "`" * max(3, max((len(run) for run in re.findall(r"`+", body)), default=0) + 1)


def _yaml_raw(code: int) -> bool:
    """Characters YAML reads back as themselves inside double quotes (its printable set,
    minus the quote, the backslash, the byte order mark and the line breaks NEL, LS, PS)."""
    if code in (0x22, 0x5C, 0xFEFF):
        return False
    return (
        0x20 <= code <= 0x7E
        or 0xA0 <= code <= 0xD7FF
        or 0xE000 <= code <= 0xFFFD
        or (code >= 0x10000)
    )


def yaml_string(text: str) -> str:
    """``text`` as a double-quoted YAML scalar that loads back as exactly ``text``, whatever it
    holds (newlines, control characters, lone surrogates, characters outside the BMP)."""
    parts = ['"']
    for character in text:
        code = ord(character)
        if _yaml_raw(code):
            parts.append(character)
        elif character in '"\\':
            parts.append("\\" + character)
        elif code < 0x100:
            parts.append(f"\\x{code:02x}")
        elif code < 0x10000:
            parts.append(f"\\u{code:04x}")
        else:
            parts.append(f"\\U{code:08x}")
    parts.append('"')
    return "".join(parts)
