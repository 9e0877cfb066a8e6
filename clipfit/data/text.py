"""Text files people make by hand or export from spreadsheets: caption files, manifests, tables.

One decoding rule for all of them: a byte-order mark (UTF-8, UTF-16 or UTF-32, either byte order)
says the encoding and is dropped; without one the file is UTF-8. Bytes that do not decode are
kept as markers (lone surrogates, which no strict decoder produces), so a reader can tell which
line or row holds them and report that item, instead of failing the whole file.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

# Longest first: a UTF-32-LE mark starts with the UTF-16-LE one.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
MARK_ERRORS = "clipfit-mark-undecodable"
UNDECODABLE = re.compile("[\ud800-\udfff]+")


def _mark_undecodable(error: UnicodeDecodeError) -> tuple[str, int]:
    bad = error.object[error.start:error.end]
    return "".join(chr(0xDC00 + byte) for byte in bad), error.end


codecs.register_error(MARK_ERRORS, _mark_undecodable)


def encoding_of(raw: bytes) -> tuple[str, int]:
    """(encoding, length of its byte-order mark) of a file's bytes."""
    for mark, encoding in BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            return encoding, len(mark)
    return "utf-8", 0


def decode_text(raw: bytes) -> tuple[str, str]:
    """(text, encoding) of a file's bytes, byte-order mark removed; undecodable bytes kept as markers."""
    encoding, skip = encoding_of(raw)
    return raw[skip:].decode(encoding, errors=MARK_ERRORS), encoding


def read_text(path: str | Path) -> tuple[str, str]:
    return decode_text(Path(path).read_bytes())


def has_undecodable(text: str) -> bool:
    return UNDECODABLE.search(text) is not None


def undecodable_reason(text: str, encoding: str) -> str:
    """Which bytes did not decode, for a message: 'not valid UTF-8 (byte 0xe9)'."""
    run = UNDECODABLE.search(text).group()
    shown = " ".join(f"{ord(ch) - 0xDC00:#04x}" for ch in run[:4]) + (" ..." if len(run) > 4 else "")
    return f"not valid {encoding.upper()} (byte{'s' if len(run) > 1 else ''} {shown})"


def repaired(text: str) -> str:
    """Undecodable bytes replaced by U+FFFD, as a lenient reader shows them."""
    return UNDECODABLE.sub("\ufffd", text)


def lines(text: str) -> list[str]:
    """Split on \\n and \\r\\n only: U+2028, NEL or a form feed inside a caption are characters of
    that caption, not line ends (str.splitlines would break the caption there)."""
    parts = text.split("\n")
    return [part[:-1] if part.endswith("\r") else part for part in parts]


def distinct(texts) -> tuple[list[str], list[int]]:
    """Each text once, in order of first appearance, and where every text of `texts` is among them:
    what lets a labelled folder's classes × templates captions be encoded once, not once per image."""
    rows: dict[str, int] = {}
    where = [rows.setdefault(text, len(rows)) for text in texts]
    return list(rows), where


def caption_lines(text: str) -> list[str]:
    """The captions of a caption file's text: one per non-blank line, stripped."""
    return [line.strip() for line in lines(text) if line.strip()]


def captions_of(raw: bytes) -> list[str]:
    """Captions from a caption file's bytes, undecodable bytes replaced (a tar shard's .txt member)."""
    return caption_lines(repaired(decode_text(raw)[0]))
