"""Check that clipfit.data.tokens.max_tokens never under-counts open_clip's tokenizer.

Too slow for the test suite (about 7 minutes on 2 cores): it tokenizes every Unicode character,
every html entity and the mojibake form of every character, the inputs that open_clip's text
cleaning (ftfy, html unescaping, lowercasing) can lengthen. Rerun it when open_clip or ftfy
change. Exits 1 and lists the texts whose bound is too small.

    python benchmarks/token_bound.py [--mojibake-stride 1]
"""

from __future__ import annotations

import argparse
import html.entities
import sys
import time
from typing import Iterable, Iterator

from clipfit.data.tokens import count_tokens, max_tokens


def every_character() -> Iterator[str]:
    return (chr(cp) for cp in range(sys.maxunicode + 1))


def named_entities() -> Iterator[str]:
    # open_clip unescapes twice after ftfy's own pass, so doubly escaped entities count too
    for name in html.entities.html5:
        yield from (f"&{name}", f"&amp;{name}", f"&amp;amp;{name}")


def numeric_entities(characters: Iterable[str]) -> Iterator[str]:
    for ch in characters:
        cp = ord(ch)
        yield from (f"&#{cp}", f"&#{cp};", f"&#x{cp:x}", f"&#x{cp:x};", f"&amp;#{cp};")


def mojibake(stride: int) -> Iterator[str]:
    """Characters' UTF-8 bytes misread as Latin-1 or Windows-1252, which ftfy repairs."""
    for cp in range(0x80, sys.maxunicode + 1, stride):
        raw = chr(cp).encode("utf-8", "surrogatepass")
        yield raw.decode("latin-1")
        yield raw.replace(b"\xa0", b" ").decode("latin-1")  # ftfy's restore_byte_a0
        try:
            yield raw.decode("cp1252")
        except UnicodeDecodeError:
            pass


def growing(characters: Iterable[str]) -> list[str]:
    """Characters the cleaning lengthens: the worst cases for numeric entities."""
    return [ch for ch in characters if count_tokens(ch) - 2 > len(ch.encode("utf-8", "surrogatepass"))]


def under_counted(texts: Iterable[str]) -> list[tuple[str, int, int]]:
    failures = []
    for text in texts:
        exact = count_tokens(text)
        if exact > max_tokens(text):
            failures.append((text, exact, max_tokens(text)))
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mojibake-stride", type=int, default=1, help="check every Nth character's mojibake")
    args = parser.parse_args()
    worst = growing(every_character()) + ["\U0010ffff", "\x00"]
    sets = {
        "every character": every_character(),
        "named html entities": named_entities(),
        "numeric html entities": numeric_entities(worst),
        "mojibake": mojibake(args.mojibake_stride),
    }
    failures = []
    for name, texts in sets.items():
        start = time.perf_counter()
        found = under_counted(texts)
        print(f"{name}: {len(found)} under-counted ({time.perf_counter() - start:.0f} s)")
        failures += found
    for text, exact, bound in failures[:50]:
        print(f"  {text!r}: {exact} tokens, bound {bound}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
