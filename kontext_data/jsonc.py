"""JSON with comments and trailing commas, as SimpleTuner's guide writes its config files.

In: text (or a path). Out: the parsed value. `//` and `/* */` comments and commas before `]` or `}` are removed
outside strings; a syntax error names the file, line and column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from kontext_data.problems import ProblemsError


class JsoncError(ProblemsError, ValueError):
    """A JSON/JSONC file cannot be parsed; the message names the file, line and column."""

    usage = True


def strip_jsonc(text: str) -> str:
    """Remove comments and trailing commas outside strings, keeping line numbers (comments become spaces)."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    pending_comma: int | None = None  # index in `out` of a comma that may be trailing
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                in_string = False
            i += 1
            continue
        if ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(" " * (end - i))
            i = end
            continue
        if ch == "/" and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append("".join(c if c == "\n" else " " for c in text[i:end]))
            i = end
            continue
        if ch in "]}" and pending_comma is not None:
            out[pending_comma] = " "
        if ch == ",":
            pending_comma = len(out)
        elif not ch.isspace():
            pending_comma = None
        if ch == '"':
            in_string = True
        out.append(ch)
        i += 1
    return "".join(out)


def loads(text: str, source: str = "<string>") -> Any:
    try:
        return json.loads(strip_jsonc(text))
    except json.JSONDecodeError as exc:
        raise JsoncError(f"{source}: line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def load(path: Path | str) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise JsoncError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return loads(text, str(path))
