"""Token counts for captions, and token batches trimmed to their real length.

Counting exactly needs open_clip's tokenizer, and importing it imports torch (seconds). Nearly
every caption is far too short to be truncated, which `max_tokens` shows without it, so
`clipfit data check` loads the tokenizer only for the few captions it cannot rule out.

open_clip's tokenizers pad every caption to the context length; `trim_tokens` cuts a batch to
the tokens its text tower's output depends on (`text_trim_rule` knows each tower kind), and
clipfit.models.encode_text runs the tower on that. Nothing here imports torch at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# --- trimming token batches to their real length ------------------------------------------------
#
# open_clip's tokenizers pad every caption to the context length (77). Where a text tower's
# output does not depend on the padding, a batch can be cut to its longest real sequence before
# the tower runs: the same features at a fraction of the cost (attention is quadratic in length).
# Which towers that holds for, and how far the padding goes, is decided here and nowhere else.

KEEP_THROUGH_POOLED = "pooled"  # causal towers: nothing after the pooled (EOT) token reaches it
KEEP_THROUGH_REAL = "real"  # towers that mask padding out: keep through the last non-padding token
POOLS_BEFORE_PADDING = ("argmax", "eos", "first")  # open_clip pool types that read a real token


@dataclass(frozen=True)
class TrimRule:
    """How a model's text tower lets a token batch be trimmed; `keep` None: never trim."""

    keep: str | None
    reason: str = ""  # why not, for untrimmed towers
    pad_id: int | None = None
    pool: str = "argmax"
    eos_id: int | None = None
    native: bool = False  # open_clip's forward cannot take a shorter batch: clipfit runs the tower itself


NO_TRIM = TrimRule(None, "unknown text tower")


def text_trim_rule(model) -> TrimRule:
    """The trimming a model's text tower allows (model: open_clip CLIP / CustomTextCLIP, or a peft
    wrapper of one).

    - CLIP's own text transformer and open_clip's TextTransformer with a causal mask, pooled at
      the EOT token (argmax / eos) or the first token: every position sees only those before it,
      so tokens after the pooled one never reach the output. open_clip's forward does not slice
      its causal mask (nor, in CLIP, its positional embedding) to a shorter input, so
      `clipfit.models.encode_text` runs these towers itself.
    - TextTransformer without a causal mask but with its padding mask (`use_pad_mask`), and the
      Hugging Face tower (attention mask from `pad_token_id`) with mean or cls pooling: padding
      is masked out of attention and pooling, so it can go.
    - Anything else (last-token pooling, which reads a padding position; bidirectional attention
      without a padding mask, where every token sees the padding; a class token appended after
      the padding, whose position embedding depends on it; max pooling; unknown towers) is left
      untrimmed.
    """
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    text = getattr(inner, "text", None)
    if text is None and hasattr(inner, "token_embedding") and hasattr(inner, "positional_embedding"):
        return causal_rule(getattr(inner, "attn_mask", None), getattr(inner, "text_pool_type", "argmax"),
                           getattr(inner, "text_eos_id", None))
    kind = type(text).__name__
    if kind == "TextTransformer":
        if text.cls_emb is not None or getattr(text, "output_tokens", False):
            return TrimRule(None, "class token appended after the padding")
        if text.attn_mask is not None:
            return causal_rule(text.attn_mask, text.pool_type, getattr(text, "eos_id", None))
        if getattr(text, "use_pad_mask", False) and text.pool_type in POOLS_BEFORE_PADDING:
            return TrimRule(KEEP_THROUGH_REAL, pad_id=int(text.pad_id), pool=text.pool_type)
        return TrimRule(None, f"bidirectional attention over the padding (pool {text.pool_type})")
    if kind == "HFTextEncoder":
        pooler = type(text.pooler).__name__
        pad_id = getattr(text.config, "pad_token_id", None)
        if pad_id is None:
            return TrimRule(None, "Hugging Face tower without a pad_token_id")
        if pooler == "MeanPooler" or (pooler in ("ClsPooler", "ClsLastHiddenStatePooler")
                                      and getattr(text.pooler, "cls_token_position", 0) == 0):
            return TrimRule(KEEP_THROUGH_REAL, pad_id=int(pad_id), pool=pooler)
        return TrimRule(None, f"Hugging Face tower with {pooler}")
    return NO_TRIM


def causal_rule(attn_mask, pool: str, eos_id: int | None) -> TrimRule:
    if attn_mask is None:
        return TrimRule(None, f"bidirectional attention over the padding (pool {pool})")
    if pool not in POOLS_BEFORE_PADDING:
        return TrimRule(None, f"pool {pool} reads a padding position")
    return TrimRule(KEEP_THROUGH_POOLED, pool=pool, eos_id=eos_id, native=True)


def needed_lengths(tokens, rule: TrimRule):
    """Per row, how many leading tokens the tower's output depends on (the full width if untrimmable)."""
    import torch

    rows, width = tokens.shape
    if rule.keep is None or width == 0:
        return torch.full((rows,), width, dtype=torch.long, device=tokens.device)
    if rule.keep == KEEP_THROUGH_REAL:
        positions = torch.arange(1, width + 1, device=tokens.device)
        return ((tokens != rule.pad_id) * positions).amax(dim=1).clamp(min=1)
    if rule.pool == "first":
        return torch.ones(rows, dtype=torch.long, device=tokens.device)
    if rule.pool == "eos":  # open_clip pools the first eos; a row without one pools position 0
        return (tokens == rule.eos_id).int().argmax(dim=1) + 1
    return tokens.argmax(dim=1) + 1  # argmax: the EOT token has the highest id


def trim_tokens(tokens, rule: TrimRule):
    """`tokens` cut to the longest sequence any row needs under `rule` (a view; unchanged when
    nothing can go). A batch whose longest caption fills the context is left as it is."""
    if rule.keep is None or tokens.shape[1] == 0:
        return tokens
    keep = int(needed_lengths(tokens, rule).max())
    return tokens if keep >= tokens.shape[1] else tokens[:, :keep]
