"""report.html's gallery and the before → after tables, on a real run of a tiny model."""

from __future__ import annotations

import json
import re

import torch

from clipfit.data.layouts import load_pairs
from clipfit.data.training import split_val
from clipfit.eval.encode import encoder_for
from clipfit.eval.retrieval import encode_pairs_all_captions
from clipfit.models import load_model
from clipfit.report_gallery import TOP_CAPTIONS, movers, ranking_facts


def validation_facts(run_dir, pairs_dir, info):
    """The gallery facts of the saved model, recomputed from scratch on the run's validation split."""
    _, val = split_val(load_pairs(pairs_dir).pairs, info["config"]["val_split"], info["config"]["seed"])
    loaded = load_model(str(run_dir))
    encoder = encoder_for(loaded, loaded.model.eval(), torch.device("cpu"), 8, 0, "fp32")
    features = encode_pairs_all_captions(encoder, val, "check")
    return val, ranking_facts(features, info["gallery_after"]["sample"])


def test_gallery_shows_the_saved_models_retrieval_with_the_right_captions_marked(tiny_run):
    _, pairs_dir, run_dir = tiny_run
    info = json.loads((run_dir / "run.json").read_text())
    before, after = info["gallery_before"], info["gallery_after"]
    assert before["sample"] == after["sample"] and len(after["sample"]) == 6
    val, recomputed = validation_facts(run_dir, pairs_dir, info)
    assert recomputed["top_captions"] == after["top_captions"]
    assert recomputed["caption_ranks"] == after["caption_ranks"]

    page = (run_dir / "report.html").read_text()
    owners = [i for i, p in enumerate(val) for _ in p.captions]
    cards = re.findall(r'<div class="card">(.*?)</div></div>', page)
    assert len(cards) == 6
    for card, image, top_before, top_after in zip(cards, after["sample"], before["top_captions"], after["top_captions"]):
        assert val[image].key in card
        lists = re.findall(r"<ol>(.*?)</ol>", card)
        assert [len(re.findall("<li", ol)) for ol in lists] == [TOP_CAPTIONS, TOP_CAPTIONS]
        for ol, top in zip(lists, (top_before, top_after)):
            assert ol.count("✓") == sum(owners[j] == image for j in top)
    improved, worsened = movers(before["caption_ranks"], after["caption_ranks"])
    assert improved or worsened
    for j in improved + worsened:
        assert f'<td class="num">{before["caption_ranks"][j] + 1}</td><td class="num">{after["caption_ranks"][j] + 1}</td>' in page


def test_report_page_is_self_contained(tiny_run):
    _, _, run_dir = tiny_run
    page = (run_dir / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 6 + 2  # sampled thumbnails and the two charts
    assert all(src.startswith("data:image/") for src in sources)
    assert "href=" not in page and "url(" not in page


def test_each_metric_is_listed_once(tiny_run):
    _, _, run_dir = tiny_run
    report = (run_dir / "report.md").read_text()
    info = json.loads((run_dir / "run.json").read_text())
    assert "retrieval/validation/image_retrieval_recall@1" in info["after"] and "text_to_image_R@1" in info["after"]
    names = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    metrics = [n for n in names if n not in ("metric", "term", "clip", "loss")]
    assert len(metrics) == len(set(metrics))
    assert "text_to_image_R@1" not in metrics and "image_retrieval_recall@1" in metrics
    assert "clip_loss" in metrics
