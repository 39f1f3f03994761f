"""Text from peers made safe for logs, reason files and DICOM ErrorComment: printable ASCII only."""

from __future__ import annotations

from typing import Any


def printable(value: Any, limit: int = 120) -> str:
    """``value`` as text with every control or non-ASCII character shown as ``\\xNN`` (a newline in a UID
    can never forge a log line), cut to ``limit`` characters."""
    out = []
    for c in str(value):
        o = ord(c)
        out.append(c if 32 <= o < 127 and c != "\\" else ("\\\\" if c == "\\" else f"\\x{o:02x}" if o < 256 else f"\\u{o:04x}"))
    s = "".join(out)
    return s if len(s) <= limit else s[: max(0, limit - 3)] + "..."
