"""Token counts for captions, to report those open_clip will truncate.

Counting exactly needs open_clip's tokenizer, and importing it imports torch (seconds). Nearly
every caption is far too short to be truncated, which `max_tokens` shows without it, so
`clipfit data check` loads the tokenizer only for the few captions it cannot rule out.
"""

from __future__ import annotations

from functools import lru_cache

START_AND_END_TOKENS = 2
# Weights of `max_tokens`, checked against every character and html entity by
# benchmarks/token_bound.py (rerun it when open_clip or ftfy change their text cleaning).
NON_ASCII_BYTE_WEIGHT = 3  # NFC turns U+1D160 (4 bytes) into three 4-byte characters: 12 bytes
AMPERSAND_WEIGHT = 12  # '&#119136;' unescapes to U+1D160, then normalises to 12 bytes


@lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def count_tokens(text: str) -> int:
    """BPE tokens of `text` plus the start and end tokens CLIP adds."""
    return len(_tokenizer().encode(text)) + START_AND_END_TOKENS


def max_tokens(text: str) -> int:
    """An upper bound on `count_tokens(text)` that needs no tokenizer.

    open_clip's BPE works on the UTF-8 bytes of the cleaned text and never merges across
    whitespace, so it makes at most one token per non-whitespace byte. Its cleaning (ftfy, html
    unescaping, lowercasing) can lengthen text, which the weights allow for: ASCII whitespace
    counts 0, other ASCII 1, '&' 12, every byte of a non-ASCII character 3.
    """
    ascii_part = text.encode("ascii", "ignore")
    non_ascii_bytes = len(text.encode("utf-8", "surrogatepass")) - len(ascii_part)
    ascii_non_space = len(b"".join(ascii_part.split()))
    ampersand_extra = (AMPERSAND_WEIGHT - 1) * text.count("&")
    return ascii_non_space + ampersand_extra + NON_ASCII_BYTE_WEIGHT * non_ascii_bytes + START_AND_END_TOKENS


def exceeds_context(text: str, context_length: int) -> bool:
    """Whether open_clip truncates `text` at `context_length` tokens (start and end included)."""
    return max_tokens(text) > context_length and count_tokens(text) > context_length
