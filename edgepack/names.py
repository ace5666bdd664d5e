"""Names that become file and directory names (builds, devices, bench result files): one rule.

Letters, digits, '.', '_' and '-', starting with a letter or digit: no path separators, no
"..", nothing hidden, the same on every filesystem and shell. At most 128 characters, leaving
room within a 255-byte file name for what edgepack adds (`-<target>`, `.tmp-<random>`).
"""
from __future__ import annotations

import re

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PLAIN_NAME_RULE = "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 128"
_NOT_PLAIN = re.compile(r"[^A-Za-z0-9._-]")


def is_plain_name(name: str) -> bool:
    return PLAIN_NAME.fullmatch(name) is not None


def checked_name(name: str | None, names_what: str) -> str | None:
    """`name` (or None) if it follows the rule, else the ValueError a pydantic validator shows;
    `names_what`: what the name becomes, e.g. "a directory under --out"."""
    if name is not None and not is_plain_name(name):
        raise ValueError(f"{PLAIN_NAME_RULE} (it names {names_what})")
    return name


def plain_name(text: str) -> str:
    """`text` with every character the rule does not allow replaced by '_' (for file names made
    from names that were never checked, like a device's)."""
    return _NOT_PLAIN.sub("_", text)
