"""CLIP-PING: the loss against hand computation, banks through the cache, heads, k-sampling, CLI runs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from clipfit import models
from clipfit.config import build_config
from clipfit.data.layouts import load_pairs
from clipfit.errors import UsageError
from clipfit.losses import ping_loss
from clipfit.methods import build_methods
from clipfit.methods.base import MethodContext
from clipfit.methods.ping import HEADS_FILE, Ping, load_heads
from clipfit.run import method_run
from conftest import run_cli, tiny_refine_args, write_pairs


# --- the loss -------------------------------------------------------------------------------

def symmetric_info_nce_by_hand(a, b, tau):
    """½[CE over rows + CE over columns] of cos(a_i, b_j)/τ, written out with math only."""
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    a, b = [unit(r) for r in a], [unit(r) for r in b]
    s = [[sum(x * y for x, y in zip(ai, bj)) / tau for bj in b] for ai in a]
    n = len(a)
    rows = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(n))) for i in range(n)) / n
    cols = sum(-s[i][i] + math.log(sum(math.exp(s[j][i]) for j in range(n))) for i in range(n)) / n
    return 0.5 * (rows + cols)


def test_ping_loss_matches_hand_computation():
    image_proj = [[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]]
    text_proj = [[0.0, 1.0], [1.0, 1.0], [3.0, -1.0]]
    image_target = [[1.0, 0.2], [0.0, 1.0], [-1.0, 1.0]]
    text_target = [[0.5, 0.5], [2.0, -1.0], [0.0, -1.0]]
    tau = 0.5
    expected = 0.5 * (symmetric_info_nce_by_hand(image_proj, image_target, tau)
                      + symmetric_info_nce_by_hand(text_proj, text_target, tau))
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = ping_loss(t(image_proj), t(text_proj), t(image_target), t(text_target), tau)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def masked_info_nce_by_hand(a, b, tau, ids):
    """As above, but a column j ≠ i whose id equals row i's is left out of row i's softmax (and vice versa)."""
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    a, b = [unit(r) for r in a], [unit(r) for r in b]
    s = [[sum(x * y for x, y in zip(ai, bj)) / tau for bj in b] for ai in a]
    n = len(a)
    kept = lambda i, j: i == j or ids[i] != ids[j]  # noqa: E731
    rows = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(n) if kept(i, j))) for i in range(n)) / n
    cols = sum(-s[i][i] + math.log(sum(math.exp(s[j][i]) for j in range(n) if kept(i, j))) for i in range(n)) / n
    return 0.5 * (rows + cols)


def test_pairs_sharing_a_neighbour_are_not_each_others_negatives():
    """Rows 0 and 2 have the same image-space neighbour (item 5), rows 1 and 2 the same text-space one."""
    image_proj = [[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]]
    text_proj = [[0.0, 1.0], [1.0, 1.0], [3.0, -1.0]]
    image_target = [[1.0, 0.2], [0.0, 1.0], [1.0, 0.2]]
    text_target = [[0.5, 0.5], [2.0, -1.0], [2.0, -1.0]]
    image_ids, text_ids = [5, 9, 5], [4, 7, 7]
    tau = 0.5
    expected = 0.5 * (masked_info_nce_by_hand(image_proj, image_target, tau, image_ids)
                      + masked_info_nce_by_hand(text_proj, text_target, tau, text_ids))
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = ping_loss(t(image_proj), t(text_proj), t(image_target), t(text_target), tau,
                    torch.tensor(image_ids), torch.tensor(text_ids))
    assert got.item() == pytest.approx(expected, rel=1e-10)
    unmasked = ping_loss(t(image_proj), t(text_proj), t(image_target), t(text_target), tau)
    assert unmasked.item() > got.item() + 0.1  # the duplicate target counted as a negative costs loss


def test_ping_loss_sends_no_gradient_into_the_targets():
    proj = torch.randn(4, 3, requires_grad=True)
    target = torch.randn(4, 3, requires_grad=True)
    ping_loss(proj, proj, target, target, 0.07).backward()
    assert proj.grad is not None and target.grad is None


# --- banks, cache, heads --------------------------------------------------------------------

@dataclass
class ContextWithMethod(MethodContext):
    method: Ping | None = None  # built from the same settings, as clipfit.run builds it


def make_context(tiny_config: Path, pairs_folder: Path, tmp_path: Path, messages: list, **settings) -> ContextWithMethod:
    config = build_config({}, set(), {"method": "ping", "model": str(tiny_config), "pretrained": "none",
                                      "batch_size": 8, "workers": 0, **settings})
    torch.manual_seed(config.seed)
    loaded = models.load_model(str(tiny_config), "none")
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    method = build_methods("ping", config.method_options(), method_run(config), {}).methods[0]
    return ContextWithMethod(model=loaded.model, loaded=loaded, method=method,
                             pairs=load_pairs(str(pairs_folder), "auto").pairs, device=torch.device("cpu"),
                             run_dir=run_dir, cache_dir=tmp_path / "cache", log=messages.append)


def prepared(ctx: ContextWithMethod) -> Ping:
    ctx.method.prepare(ctx)
    return ctx.method


def encoded(messages):
    return [m for m in messages if m.startswith("encoded ") and "ping-neighbours" not in m]


def test_second_run_reuses_the_banks_and_a_changed_caption_re_encodes_only_text(tiny_config, tmp_path):
    folder = write_pairs(tmp_path / "pairs", n=12)
    first_log, second_log, third_log = [], [], []
    first = prepared(make_context(tiny_config, folder, tmp_path, first_log))
    assert len(encoded(first_log)) == 2 and first.report()["bank_cache_image"] == "built"

    second = prepared(make_context(tiny_config, folder, tmp_path, second_log))
    assert encoded(second_log) == []
    assert sum("feature cache hit" in m for m in second_log) == 3  # image bank, text bank, neighbours
    assert torch.equal(first.text_bank, second.text_bank)
    assert (second.report()["bank_cache_image"], second.report()["bank_cache_text"]) == ("hit", "hit")

    (folder / "img004.txt").write_text("a completely different caption\n")
    third = prepared(make_context(tiny_config, folder, tmp_path, third_log))
    assert [m.split(" for ")[1].split()[0] for m in encoded(third_log)] == ["ping-text"]
    assert not torch.equal(third.text_bank[4], first.text_bank[4])
    assert torch.equal(third.text_bank[5], first.text_bank[5])


def test_banks_are_unit_rows_of_the_frozen_starting_model(tiny_config, tmp_path):
    folder = write_pairs(tmp_path / "pairs", n=8)
    ctx = make_context(tiny_config, folder, tmp_path, [])
    method = prepared(ctx)
    norms = method.image_bank.float().norm(dim=1)
    assert torch.allclose(norms, torch.ones(8), atol=2e-3)
    with torch.no_grad():
        ctx.model.eval()
        text = ctx.model.encode_text(ctx.loaded.tokenizer([ctx.pairs[2].captions[0]]), normalize=True)[0]
    assert torch.allclose(method.text_bank[2].float(), text, atol=2e-3)


def test_heads_start_as_identity_for_the_starting_model_and_save_and_reload(tiny_config, tmp_path):
    folder = write_pairs(tmp_path / "pairs", n=8)
    ctx = make_context(tiny_config, folder, tmp_path, [])
    method = prepared(ctx)
    for name in ("h_I", "h_T", "x_I", "x_T"):
        assert torch.equal(getattr(method.heads, name).weight, torch.eye(32))
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p))
    method.save(ctx.run_dir)
    saved = load_heads(ctx.run_dir / HEADS_FILE)
    assert set(saved) == {"h_I.weight", "h_T.weight", "x_I.weight", "x_T.weight"}
    assert torch.equal(saved["x_T.weight"], method.heads.x_T.weight)

    fresh = prepared(make_context(tiny_config, folder, tmp_path, []))
    params_before = fresh.parameters()
    fresh.load_state_dict(method.state_dict())
    assert fresh.parameters()[0] is params_before[0]  # restored in place: the optimiser keeps its tensors
    assert torch.equal(fresh.heads.h_I.weight, method.heads.h_I.weight)


def step_for(method, indices, seed):
    b = len(indices)
    return SimpleNamespace(indices=torch.tensor(indices), generator=torch.Generator().manual_seed(seed),
                           image=torch.nn.functional.normalize(torch.randn(b, 32), dim=-1),
                           text=torch.nn.functional.normalize(torch.randn(b, 32), dim=-1),
                           logit_scale=torch.tensor(10.0), gather=lambda t: t,
                           positives=lambda: None)  # no repeats: one-hot targets


def test_ping_k_samples_among_the_top_k_reproducibly(tiny_config, tmp_path):
    folder = write_pairs(tmp_path / "pairs", n=12)
    method = prepared(make_context(tiny_config, folder, tmp_path, [], ping_k=3))
    assert method.image_neighbours.shape == (12, 3)
    indices = list(range(12)) * 4
    image_a, text_a = method.neighbour_targets(step_for(method, indices, seed=1))
    image_b, _ = method.neighbour_targets(step_for(method, indices, seed=1))
    assert torch.equal(image_a, image_b)
    bank = method.image_bank.float()
    for row, i in enumerate(indices):
        matches = [j for j in method.image_neighbours[i].tolist() if torch.equal(bank[j], image_a[row])]
        assert matches, f"target of item {i} is not one of its top-3 image neighbours"
    picked = {tuple(image_a[row].tolist()) for row, i in enumerate(indices) if i == 0}
    assert len(picked) > 1  # 4 draws for item 0 over 3 neighbours: not always the same one


def test_losses_returns_the_wanted_terms_and_trains_the_heads(tiny_config, tmp_path):
    folder = write_pairs(tmp_path / "pairs", n=8)
    method = prepared(make_context(tiny_config, folder, tmp_path, []))
    parts = method.losses(step_for(method, list(range(8)), seed=0), {"nn", "xnn"})
    assert set(parts) == {"nn", "xnn"}
    (parts["nn"] + parts["xnn"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())


def test_ping_k_too_large_and_bare_architecture_names_are_usage_errors(tiny_config, tmp_path):
    folder = write_pairs(tmp_path / "pairs", n=4)
    with pytest.raises(UsageError, match="--ping-k 4"):
        prepared(make_context(tiny_config, folder, tmp_path, [], ping_k=4))
    with pytest.raises(UsageError, match="--ping-image-encoder ViT-B-32: name its weights"):
        prepared(make_context(tiny_config, folder, tmp_path, [], ping_image_encoder="ViT-B-32"))


def test_other_encoders_an_open_clip_spec_and_a_local_hf_text_folder(tiny_config, tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "number", "red", "green", "blue",
             "yellow", "purple", "orange", "black", "white"] + [str(i) for i in range(10)]
    hf = tmp_path / "hf-text"
    hf.mkdir()
    (hf / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(hf / "vocab.txt")).save_pretrained(str(hf))
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(hf))

    folder = write_pairs(tmp_path / "pairs", n=8)
    ctx = make_context(tiny_config, folder, tmp_path, [], ping_text_encoder=str(hf),
                       ping_image_encoder=f"{tiny_config}@none")
    method = prepared(ctx)
    assert method.text_bank.shape == (8, 24) and method.image_bank.shape == (8, 32)
    assert method.heads.h_T.weight.shape == (24, 32) and method.heads.x_T.weight.shape == (32, 32)
    assert not torch.equal(method.heads.h_I.weight, torch.eye(32))  # another encoder: no identity start


# --- command line ---------------------------------------------------------------------------

def check_ping_run(out: Path) -> None:
    info = json.loads((out / "run.json").read_text())
    facts = info["methods"]["ping"]
    assert facts["bank_items"] == 16 and facts["bank_cache_image"] == "built"
    assert facts["bank_build_seconds"] >= 0 and facts["neighbour_terms_ms_per_step_median"] > 0
    assert "step_ms_median" in facts
    assert set(load_file(str(out / HEADS_FILE))) == {"h_I.weight", "h_T.weight", "x_I.weight", "x_T.weight"}
    assert not any("h_I" in k for k in load_file(str(out / "model.safetensors")))
    assert "bank_build_seconds" in (out / "report.md").read_text()


def test_cli_refine_plus_ping_trains_all_terms(tiny_config, pairs_dir, tmp_path):
    out = tmp_path / "run"
    run_cli(*tiny_refine_args(pairs_dir, out, tiny_config, "--method", "refine+ping", "--max-steps", "2",
                              "--cache-dir", str(tmp_path / "cache")), check=True)
    check_ping_run(out)
    assert set(json.loads((out / "run.json").read_text())["resolved"]["weights"]) == {"rafa", "hycd", "clip", "nn", "xnn"}


def test_cli_ping_run_then_a_second_run_hits_the_cache_and_cache_ls_clear_manage_it(tiny_config, pairs_dir, tmp_path):
    cache = str(tmp_path / "cache")
    for run in ("first", "second"):
        run_cli(*tiny_refine_args(pairs_dir, tmp_path / run, tiny_config, "--method", "ping", "--max-steps", "2",
                                  "--cache-dir", cache), check=True)
    check_ping_run(tmp_path / "first")
    facts = json.loads((tmp_path / "second" / "run.json").read_text())["methods"]["ping"]
    assert (facts["bank_cache_image"], facts["bank_cache_text"]) == ("hit", "hit")
    listing = json.loads(run_cli("cache", "ls", "--cache-dir", cache, "--json", check=True).stdout)
    assert {e["kind"] for e in listing["entries"]} == {"ping-image", "ping-text", "ping-neighbours"}
    assert "removed 3 entries" in run_cli("cache", "clear", "--cache-dir", cache, check=True).stdout
    assert list((tmp_path / "cache" / "features").iterdir()) == []
