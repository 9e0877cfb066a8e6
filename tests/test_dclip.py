"""DCLIP: the student loss, the teacher, per-token states, and both stages through the CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipfit import models
from clipfit.data.tokens import count_tokens
from clipfit.dclip.embed import encode_tokens, token_states
from clipfit.dclip.teacher import (CrossModalTeacher, RegionTokenBank, TeacherTraining, attention_pool,
                                   check_teacher_dim, load_teacher, save_teacher, teacher_heads, train_teacher)
from clipfit.errors import ModelError, UsageError
from clipfit.io import read_jsonl
from clipfit.losses import dclip_loss, dclip_loss_parts
from conftest import run_cli, tiny_refine_args

# --- the student loss ---------------------------------------------------------------------------


def symmetric_ce_by_hand(similarity: list[list[float]], temperature: float) -> float:
    def ce(rows):
        return sum(-rows[i][i] / temperature + math.log(sum(math.exp(v / temperature) for v in rows[i]))
                   for i in range(len(rows))) / len(rows)
    transposed = [list(col) for col in zip(*similarity)]
    return 0.5 * (ce(similarity) + ce(transposed))


def test_dclip_loss_matches_hand_computation():
    student_image = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # directions e1, e2
    student_text = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    teacher_image = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    frozen_text = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    r = 1 / math.sqrt(2)
    img = ((1 - 1) + (1 - r)) / 2  # cos(e1, e1) = 1, cos(e2, (1,1)) = 1/√2
    txt = ((1 - 1) + (1 - 0)) / 2  # same direction, then orthogonal
    con = symmetric_ce_by_hand([[r, 0.0], [r, 1.0]], 0.05)  # cosines of image i with text j

    parts = dclip_loss_parts(student_image, student_text, teacher_image, frozen_text, temperature=0.05)
    assert parts["img"].item() == pytest.approx(img, rel=1e-5)
    assert parts["txt"].item() == pytest.approx(txt, rel=1e-5)
    assert parts["con"].item() == pytest.approx(con, rel=1e-5)
    total = dclip_loss(student_image, student_text, teacher_image, frozen_text, weights=(2.0, 0.5, 1.0))
    assert total.item() == pytest.approx(2 * img + 0.5 * txt + con, rel=1e-5)


def test_dclip_loss_is_zero_on_the_distillation_terms_when_student_matches_targets():
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    parts = dclip_loss_parts(image, text, 5 * image, 0.1 * text)
    assert parts["img"].item() == pytest.approx(0, abs=1e-6) and parts["txt"].item() == pytest.approx(0, abs=1e-6)


# --- the teacher --------------------------------------------------------------------------------

def test_attention_pool_matches_hand_computation_and_ignores_padding():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-50.0, 7.0]]])
    mask = torch.tensor([[True, True, True, False]])
    # mean of the three real rows is (2/3, 2/3): cosines 1/√2, 1/√2 and 1; T = 2
    logits = [1 / math.sqrt(2) / 2, 1 / math.sqrt(2) / 2, 1 / 2]
    weights = [math.exp(v) / sum(math.exp(u) for u in logits) for v in logits]
    expected = [weights[0] + weights[2], weights[1] + weights[2]]
    pooled = attention_pool(x, mask, temperature=2.0)
    assert pooled[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_teacher_heads_are_eight_when_possible():
    assert teacher_heads(512) == 8 and teacher_heads(32) == 8 and teacher_heads(12) == 4 and teacher_heads(7) == 1


def random_inputs(batch=3, dim=32, tokens=(5, 2, 4), regions=(6, 1, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(batch, max(tokens), dim, generator=g)
    r = torch.randn(batch, max(regions), dim, generator=g)
    token_mask = torch.arange(max(tokens)).unsqueeze(0) < torch.tensor(tokens).unsqueeze(1)
    region_mask = torch.arange(max(regions)).unsqueeze(0) < torch.tensor(regions).unsqueeze(1)
    return t, token_mask, r, region_mask


def test_teacher_gives_one_image_embedding_per_pair_and_padding_changes_nothing():
    torch.manual_seed(0)
    teacher = CrossModalTeacher(32).eval()
    tokens, token_mask, regions, region_mask = random_inputs()
    out = teacher(tokens, token_mask, regions, region_mask)
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    # row 1 alone, unpadded (2 tokens, 1 region), must give the same embedding as inside the padded batch
    alone = teacher(tokens[1:2, :2], token_mask[1:2, :2], regions[1:2, :1], region_mask[1:2, :1])
    torch.testing.assert_close(alone[0], out[1], rtol=1e-5, atol=1e-6)


def test_teacher_reload_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    teacher = CrossModalTeacher(32).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))  # not the fresh-init values a reload could fall back to
    path = tmp_path / "teacher.safetensors"
    save_teacher(teacher, path, TeacherTraining(2, 1e-5, 8, 0, loss_per_epoch=[2.5, 2.25]))
    loaded, metadata = load_teacher(path)
    inputs = random_inputs(seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), teacher(*inputs))
    assert json.loads(metadata["loss_per_epoch"]) == [2.5, 2.25]
    with pytest.raises(UsageError, match="32-d embeddings, this model's are 64-d"):
        check_teacher_dim(loaded, 64, path)
    with pytest.raises(UsageError, match="--dclip-teacher .*missing.safetensors: file not found"):
        load_teacher(tmp_path / "missing.safetensors")
    models.save_state_dict({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelError, match="not a clipfit DCLIP teacher"):
        load_teacher(tmp_path / "other.safetensors")


def unit_rows(n, dim, generator):
    return F.normalize(torch.randn(n, dim, generator=generator), dim=-1)


def toy_bank(pairs=8, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    region_counts = torch.tensor([1 + i % 3 for i in range(pairs)])
    caption_counts = torch.tensor([1 + i % 2 for i in range(pairs)])
    token_counts = torch.tensor([2 + j % 4 for j in range(int(caption_counts.sum()))])
    return RegionTokenBank(
        regions=unit_rows(int(region_counts.sum()), dim, g), region_counts=region_counts,
        tokens=unit_rows(int(token_counts.sum()), dim, g), token_counts=token_counts,
        sentences=unit_rows(len(token_counts), dim, g), caption_counts=caption_counts)


def test_bank_cuts_the_flat_tables_into_each_pairs_segments():
    bank = toy_bank()
    rows = bank.caption_rows([3, 5], [1, 0])
    assert rows == [int(bank.caption_counts[:3].sum()) + 1, int(bank.caption_counts[:5].sum())]
    tokens, token_mask, regions, region_mask = bank.teacher_inputs([3, 5], rows, "cpu")
    first_region = int(bank.region_counts[:3].sum())
    assert region_mask.sum(1).tolist() == [int(bank.region_counts[3]), int(bank.region_counts[5])]
    assert torch.equal(regions[0, :int(bank.region_counts[3])], bank.regions[first_region:first_region + 1])
    assert token_mask.sum(1).tolist() == [int(bank.token_counts[r]) for r in rows]
    assert (regions[~region_mask] == 0).all() and (tokens[~token_mask] == 0).all()


def test_teacher_training_lowers_the_infonce_and_changes_only_the_teacher():
    bank = toy_bank()
    before = bank.tokens.clone()
    torch.manual_seed(0)
    teacher = CrossModalTeacher(16)
    plan = TeacherTraining(epochs=30, lr=1e-2, batch_size=8, seed=0)
    train_teacher(teacher, bank, plan, "cpu", lambda _: None)
    assert len(plan.loss_per_epoch) == 30
    assert plan.loss_per_epoch[-1] < plan.loss_per_epoch[0] - 0.1
    assert torch.equal(bank.tokens, before)


def test_teacher_training_takes_multi_positive_targets_from_the_caption_groups():
    """One step over the whole bank logs the initial teacher's InfoNCE: bit for bit the one-hot value
    when no caption group repeats, another when captions share groups."""
    def first_loss(groups):
        bank = toy_bank()
        bank.caption_groups = groups
        torch.manual_seed(0)
        teacher = CrossModalTeacher(16)
        plan = TeacherTraining(epochs=1, lr=1e-2, batch_size=8, seed=0)
        train_teacher(teacher, bank, plan, "cpu", lambda _: None)
        return plan.loss_per_epoch[0]

    captions = int(toy_bank().caption_counts.sum())
    assert first_loss(torch.arange(captions)) == first_loss(None)
    assert first_loss(torch.arange(captions) % 2) != pytest.approx(first_loss(None), rel=1e-3)


# --- per-token states of the frozen text tower ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return models.load_model(str(tiny_config), "none")


def test_native_clip_token_states_pool_to_the_sentence_embedding(tiny_model):
    ids = tiny_model.tokenizer(["a red cat on a mat", "blue"])
    with torch.no_grad():
        sentence, states = token_states(tiny_model.model.eval(), ids)
    end = ids.argmax(dim=-1)  # CLIP pools the end-of-text token
    assert states.shape == (2, int(end.max()) + 1, 32)  # the padding after the last end token is trimmed
    torch.testing.assert_close(states[torch.arange(2), end], sentence)


def test_token_embeddings_keep_the_content_tokens_only(tiny_model):
    captions = ["a red cat on a mat", "blue", ""]
    out = encode_tokens(tiny_model.model.eval(), captions, tiny_model.tokenizer, torch.device("cpu"), batch_size=2)
    assert out["token_counts"].tolist() == [count_tokens("a red cat on a mat") - 2, 1, 1]
    assert out["tokens"].shape == (int(out["token_counts"].sum()), 32)
    assert out["tokens"].norm(dim=-1).tolist() == pytest.approx([1.0] * len(out["tokens"]), rel=1e-5)
    # the empty caption has no content token and keeps its sentence embedding instead
    torch.testing.assert_close(out["tokens"][-1], out["sentences"][-1])


class TinyHFClip(nn.Module):
    """Just enough of open_clip's CustomTextCLIP around an HFTextEncoder."""

    def __init__(self):
        super().__init__()
        from open_clip.hf_model import HFTextEncoder
        from transformers import BertConfig

        config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16)
        self.text = HFTextEncoder("bert", output_dim=8, config=config, pooler_type="mean_pooler", proj_type="linear")

    def encode_text(self, ids):
        return self.text(ids)


def test_hf_text_tower_token_states_average_to_its_mean_pooled_sentence():
    torch.manual_seed(0)
    model = TinyHFClip().eval()
    ids = torch.tensor([[1, 7, 9, 2, 0, 0], [1, 5, 2, 0, 0, 0]])  # 0 is BERT's padding
    with torch.no_grad():
        sentence, states = token_states(model, ids)
    real = (ids[:, :states.shape[1]] != 0).unsqueeze(-1).float()
    torch.testing.assert_close((states * real).sum(1) / real.sum(1), sentence, rtol=1e-5, atol=1e-6)


def test_unsupported_text_tower_is_a_usage_error():
    model = SimpleNamespace(text=nn.Linear(2, 2))
    with pytest.raises(UsageError, match="cannot read per-token states .*Linear"):
        token_states(model, torch.zeros(1, 4, dtype=torch.long))


# --- both stages through the CLI -------------------------------------------------------------------

def first_step(run_dir):
    return next(row for row in read_jsonl(run_dir / "metrics.jsonl") if row.get("step") == 1)


def test_dclip_trains_both_stages_and_reuses_a_saved_teacher(tmp_path, pairs_dir, tiny_config):
    cache = tmp_path / "cache"
    first = tmp_path / "first"
    run_cli(*tiny_refine_args(pairs_dir, first, tiny_config, "--method", "dclip", "--dclip-teacher-epochs", "2",
                              "--cache-dir", cache), check=True)
    facts = json.loads((first / "run.json").read_text())["methods"]["dclip"]
    assert facts["stage 1"].startswith("teacher trained 2 epoch(s)")
    assert facts["teacher InfoNCE per epoch"].startswith("1: ") and "2: " in facts["teacher InfoNCE per epoch"]
    assert facts["regions"] == "grid 2x2 + full + centre, 6.0 per image"
    assert (first / "teacher.safetensors").is_file()
    # the authors' frozen parts: of the image tower only attention and output projections train
    assert facts["image tower"].startswith("--dclip-vision proj:")
    from safetensors.torch import load_file

    from clipfit import models
    torch.manual_seed(0)  # the run's seed: the same random start
    start = models.load_model(str(tiny_config), "none").model.state_dict()
    trained = load_file(first / "model.safetensors")
    visual = [k for k in trained if k.startswith("visual.")]
    moved = {k for k in visual if not torch.equal(trained[k], start[k])}
    assert moved and all("attn.in_proj" in k or "attn.out_proj" in k or k == "visual.proj" for k in moved)
    assert any(not torch.equal(trained[k], start[k]) for k in trained if k.startswith("transformer."))
    report = (first / "report.md").read_text()
    for text in ("| dclip_img |", "| dclip_txt |", "| dclip_con |", "teacher InfoNCE per epoch", "stage 1 seconds"):
        assert text in report
    assert first_step(first)["dclip_txt"] == pytest.approx(0, abs=1e-6)  # the student starts as the frozen model
    cached = sorted(p.name for p in (cache / "features").iterdir())
    assert [name.rsplit("-", 1)[0] for name in cached] == ["dclip-regions", "dclip-tokens", "teacher-rows"]

    second = tmp_path / "second"
    run_cli(*tiny_refine_args(pairs_dir, second, tiny_config, "--method", "dclip", "--dclip-teacher-epochs", "2",
                              "--dclip-teacher", first / "teacher.safetensors", "--cache-dir", cache), check=True)
    facts = json.loads((second / "run.json").read_text())["methods"]["dclip"]
    assert facts["stage 1"].startswith("skipped: teacher loaded from")
    assert "stage 1 seconds" not in facts
    assert sorted(p.name for p in (cache / "features").iterdir()) == cached  # cache hits, nothing re-encoded
    assert (second / "teacher.safetensors").read_bytes() == (first / "teacher.safetensors").read_bytes()
    # same teacher, same targets: the first step's loss parts agree exactly
    assert {k: first_step(second)[k] for k in ("dclip_img", "dclip_txt", "dclip_con")} == \
        {k: first_step(first)[k] for k in ("dclip_img", "dclip_txt", "dclip_con")}
