"""`max_tokens` bounds open_clip's token count without its tokenizer; `exceeds_context` is exact.

benchmarks/token_bound.py checks the bound on every character and html entity; these are the
cases that exercise each weight, against open_clip's real tokenizer.
"""

import json

import pytest

from clipfit.data.tokens import count_tokens, exceeds_context, max_tokens
from conftest import run_cli, write_pairs

TRICKY_CAPTIONS = [
    "",
    "   \t\n ",
    "a photo of a red cat on a mat",
    "photograph " * 20,  # many characters, few tokens
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x9q!z@#%^*()_+{}|:<>?~`-=[]\\;',./" * 2,
    "\U0001d160\U0001d164\U0001d1c0",  # NFC: one 4-byte character becomes three
    "İSTANBUL İzmir",  # lowercasing İ adds a combining dot
    "&nGt; &bne; &fjlig; &amp;nGt; &nLl;&nGg;",  # named entities, one doubly escaped
    "&#119136; &#x1d160 &amp;#119136;",  # numeric entities that normalise to 12 bytes
    "cafÃ© Ã\xa0 la mode â€¦ Ã\x85",  # mojibake that ftfy repairs
    "\x85\x85\x85",  # a C1 control ftfy turns into '…'
    "ﬃ ﬁ ﬂ ＡＢＣ １２３ ｶﾞ",  # ligatures, full and half width
    "👨‍👩‍👧‍👦 🏳️‍🌈 🤖🤖🤖",
    "東京タワーの夜景 北京烤鸭 서울의 밤",
    "مرحبا بالعالم नमस्ते दुनिया",
    "e\u0301 a\u0308 n\u0303 \u200b\u200d\ufeff",
    "\ufdfa \u3300 \u2126",
    "<start_of_text> <end_of_text>",
    "\ud800 lone surrogate",
    "\x00\x01\x1c\x1f control",
]


@pytest.mark.parametrize("caption", TRICKY_CAPTIONS)
def test_bound_never_under_counts(caption):
    assert max_tokens(caption) >= count_tokens(caption)


def test_plain_ascii_bound_is_the_non_space_character_count():
    assert max_tokens("a red  cat\ton a mat") == len("aredcatonamat") + 2


@pytest.mark.parametrize("caption", ["word " * 75, "word " * 76, "photograph " * 20, "a" * 300, "東京" * 40])
def test_exceeds_context_agrees_with_the_exact_count(caption):
    assert exceeds_context(caption, 77) == (count_tokens(caption) > 77)


def test_data_check_counts_only_captions_really_over_the_context(tmp_path):
    pairs = write_pairs(tmp_path / "pairs", n=3)
    (pairs / "img000.txt").write_text("word " * 100)  # over
    (pairs / "img001.txt").write_text("photograph " * 20)  # over the bound, under the context
    result = run_cli("data", "check", pairs, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["summary"]["captions_over_context"] == 1
