"""Token counts for captions, to report those open_clip will truncate."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def count_tokens(text: str) -> int:
    """BPE tokens of `text` plus the start and end tokens CLIP adds."""
    return len(_tokenizer().encode(text)) + 2
