"""The report's gallery: what retrieval looked like before and after, on the evaluation pairs.

`ranking_facts` keeps, for one model state, the top captions of a fixed sample of images and the
rank of every caption's own image; run.json stores those for before and after (so a resumed run
keeps its starting model's), and the report shows them with thumbnails embedded:
  - each sampled image with its top-3 retrieved captions before and after, the correct one marked;
  - the caption queries whose image moved up or down the ranking the most.
"""

from __future__ import annotations

import base64
import html
import io
import random
from pathlib import Path
from typing import Any

import torch

SAMPLE_IMAGES = 6
TOP_CAPTIONS = 3
MOVERS = 4  # queries shown among those that improved most, and among those that worsened most
THUMBNAIL_PX = 112


def sample_indices(n_images: int, seed: int, k: int = SAMPLE_IMAGES) -> list[int]:
    """A fixed sample: the same images before and after, and in every run with this seed."""
    order = list(range(n_images))
    random.Random(seed).shuffle(order)
    return sorted(order[:k])


def ranking_facts(features, sample: list[int]) -> dict[str, Any]:
    """Top caption indices of the sampled images, and each caption's 0-based image rank.

    `features` is a clipfit.eval.retrieval.PairFeatures (normalised embeddings)."""
    from clipfit.eval.metrics import chunked_ranks

    image, text, owner = features.image, features.text, features.text_image
    k = min(TOP_CAPTIONS, len(text))
    top = (image[sample] @ text.T).topk(k, dim=1).indices.tolist() if sample else []
    ranks = chunked_ranks(text, image, lambda a, b: owner[a:b, None] == torch.arange(len(image))[None, :])
    return {"sample": sample, "top_captions": top, "caption_ranks": [int(r) for r in ranks.tolist()]}


def movers(before: list[int], after: list[int]) -> tuple[list[int], list[int]]:
    """Caption indices whose image rank improved most, and worsened most (ties by index)."""
    change = [(a - b, j) for j, (b, a) in enumerate(zip(before, after)) if a != b]
    improved = [j for d, j in sorted(change) if d < 0][:MOVERS]
    worsened = [j for d, j in sorted(change, key=lambda c: (-c[0], c[1])) if d > 0][:MOVERS]
    return improved, worsened


def thumbnail(path: Path, max_pixels: int | None = None) -> str:
    """The image as a small JPEG data URI, so the page needs no other file."""
    from clipfit.data.images import DEFAULT_MAX_PIXELS, open_rgb

    image = open_rgb(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def caption_table(pairs) -> tuple[list[str], list[int]]:
    captions = [c for p in pairs for c in p.captions]
    owners = [i for i, p in enumerate(pairs) for _ in p.captions]
    return captions, owners


def caption_list(indices: list[int], captions: list[str], owners: list[int], image: int) -> str:
    items = []
    for j in indices:
        right = owners[j] == image
        mark = '<span class="ok">✓</span> ' if right else '<span class="no">✗</span> '
        items.append(f'<li class="{"ok" if right else "no"}">{mark}{html.escape(captions[j])}</li>')
    return "<ol>" + "".join(items) + "</ol>"


def sample_cards(pairs, before: dict, after: dict, captions, owners, max_pixels) -> list[str]:
    cards = []
    for position, image in enumerate(before["sample"]):
        cards.append(
            f'<div class="card"><img alt="{html.escape(pairs[image].key)}" src="{thumbnail(pairs[image].image, max_pixels)}">'
            f'<div><p class="key">{html.escape(pairs[image].key)}</p>'
            f'<p class="when">before</p>{caption_list(before["top_captions"][position], captions, owners, image)}'
            f'<p class="when">after</p>{caption_list(after["top_captions"][position], captions, owners, image)}</div></div>')
    return cards


def mover_rows(indices: list[int], pairs, before: dict, after: dict, captions, owners, max_pixels) -> str:
    rows = []
    for j in indices:
        image = owners[j]
        rows.append(f'<tr><td><img alt="" src="{thumbnail(pairs[image].image, max_pixels)}"></td>'
                    f'<td>{html.escape(captions[j])}</td><td class="num">{before["caption_ranks"][j] + 1}</td>'
                    f'<td class="num">{after["caption_ranks"][j] + 1}</td></tr>')
    return ('<table class="movers"><thead><tr><th>image</th><th>caption (query)</th><th>rank before</th>'
            '<th>rank after</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>") if rows else "<p>none</p>"


STYLE = (".gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(26em,1fr));gap:1em}"
         ".card{display:flex;gap:.8em;border:1px solid #ddd;padding:.6em;border-radius:4px}"
         ".card img{width:112px;height:112px;object-fit:contain;flex:none}.card ol{margin:.1em 0 .4em 1.2em;padding:0}"
         ".card li{font-size:.9em}.key{font-weight:600;margin:0}.when{margin:.2em 0 0;color:#666;font-size:.85em}"
         "li.ok{color:#1a7f37}li.no{color:#333}.ok{color:#1a7f37;font-weight:700}.no{color:#b42318}"
         "table.movers img{width:64px;height:64px;object-fit:contain}")


def gallery_html(pairs, before: dict, after: dict, max_pixels: int | None = None) -> str:
    """The gallery section of report.html; empty without both rankings."""
    if not before or not after or not pairs or before.get("sample") != after.get("sample"):
        return ""
    captions, owners = caption_table(pairs)
    if len(captions) != len(before["caption_ranks"]) or len(captions) != len(after["caption_ranks"]):
        return ""  # the pairs changed since the rankings were made
    improved, worsened = movers(before["caption_ranks"], after["caption_ranks"])
    return "\n".join([
        f"<style>{STYLE}</style>",  # under report.md's own "Gallery" heading, the page's last section
        f"<p>{len(before['sample'])} fixed evaluation images with the {TOP_CAPTIONS} captions each retrieves "
        "among all evaluation captions, before and after training (✓ its own caption).</p>",
        '<div class="gallery">', *sample_cards(pairs, before, after, captions, owners, max_pixels), "</div>",
        "<h3>Queries that improved most</h3>",
        "<p>Each caption searches all evaluation images; rank 1 means its own image came first.</p>",
        mover_rows(improved, pairs, before, after, captions, owners, max_pixels),
        "<h3>Queries that worsened most</h3>",
        mover_rows(worsened, pairs, before, after, captions, owners, max_pixels),
    ])


def gallery_markdown(before: dict, after: dict, pairs) -> list[str]:
    """report.md's last section: how many caption queries moved up and down."""
    if not before or not after or not pairs:
        return []
    pairs_ranks = list(zip(before["caption_ranks"], after["caption_ranks"]))
    up = sum(a < b for b, a in pairs_ranks)
    down = sum(a > b for b, a in pairs_ranks)
    return ["## Gallery", "",
            f"Of {len(pairs_ranks)} caption queries, {up} found their image higher after training, {down} lower "
            f"and {len(pairs_ranks) - up - down} at the same rank. report.html shows sampled images with their "
            "top captions before and after, and the queries that moved most.", ""]
