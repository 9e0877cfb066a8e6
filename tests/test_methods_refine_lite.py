"""The refine and lite methods: composition, the frozen teacher, LoRA, state, and CLI runs."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from clipfit import run as run_module
from clipfit.frozen import prepare as teacher_module  # where prepare_frozen finds FrozenTeacher
from clipfit.config import build_config
from clipfit.errors import UsageError
from clipfit.methods import build_methods as build_from_run, parse_weights
from clipfit.methods.lite import INITIAL_TEMPERATURE
from clipfit.progress import Progress
from conftest import run_cli, tiny_refine_args


def config(**settings):
    return build_config({}, set(), settings)


def build_methods(spec, config, overrides):
    """The methods of `spec` as a run with `config` builds them: options and run context."""
    return build_from_run(spec, config.method_options(), run_module.method_run(config), overrides)


def built_lite(config):
    return build_methods("lite", config, {}).methods[0]


# --- composition ------------------------------------------------------------------------------

def test_refine_alone_trains_rafa_and_hycd_and_skips_the_zero_weight_clip_term():
    composite = build_methods("refine", config(), {})
    assert composite.weights == {"rafa": 1.0, "hycd": 1.0, "clip": 0.0}
    assert composite.active_terms == ["rafa", "hycd"]
    assert composite.needs_teacher


def test_contrastive_plus_refine_keeps_the_contrastive_weight_and_one_owner_per_term():
    composite = build_methods("contrastive+refine", config(), {})
    contrastive, refine = composite.methods
    assert composite.weights == {"clip": 1.0, "rafa": 1.0, "hycd": 1.0}
    assert composite.owners["clip"] is contrastive and composite.owners["rafa"] is refine


def test_weight_overrides_and_lite_prior_mix():
    composite = build_methods("refine+lite", config(lite_prior_weight=0.1), parse_weights(["clip=0.5", "rafa=2"]))
    assert composite.weights == {"rafa": 2.0, "hycd": 1.0, "clip": 0.5, "lite": pytest.approx(0.9),
                                 "lite_prior": 0.1}
    with pytest.raises(UsageError, match="no such loss term"):
        build_methods("lite", config(), {"hycd": 1.0})


def test_lite_prior_weight_must_leave_the_jsd_term_positive():
    with pytest.raises(UsageError, match="lite-prior-weight"):
        config(lite_prior_weight=1.0)


# --- lite state -------------------------------------------------------------------------------

def test_learned_critic_starts_at_one_over_0_07_and_restores_in_place():
    method = built_lite(config(lite_critic="learned"))
    (log_scale,) = method.parameters()
    assert log_scale.exp().item() == pytest.approx(1 / INITIAL_TEMPERATURE)
    other = built_lite(config(lite_critic="learned"))
    with torch.no_grad():
        log_scale.fill_(1.25)
    other_param = other.parameters()[0]
    other.load_state_dict(method.state_dict())
    assert other.parameters()[0] is other_param and other_param.item() == 1.25


def prepared_lite_with_prior(dim=8):
    method = built_lite(config(lite_prior_weight=0.1, lite_critic="logit-scale"))
    ctx = SimpleNamespace(loaded=SimpleNamespace(model_cfg={"embed_dim": dim}), model=None, pairs=[0, 1, 2],
                          device=torch.device("cpu"))
    method.prepare(ctx)
    return method


def lite_step(seed):
    image_raw, text_raw = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    return SimpleNamespace(image_raw=image_raw, text_raw=text_raw, image=F.normalize(image_raw, dim=-1),
                           text=F.normalize(text_raw, dim=-1), logit_scale=torch.tensor(10.0),
                           generator=torch.Generator().manual_seed(seed), gather=lambda t: t,
                           positives=lambda: None)  # no repeats: one-hot targets


def test_lite_prior_trains_two_discriminators_and_the_features_reproducibly():
    method = prepared_lite_with_prior()
    assert set(method.prior) == {"image", "text"} and len(method.parameters()) == 12
    step = lite_step(5)
    parts = method.losses(step, {"lite", "lite_prior"})
    parts["lite_prior"].backward()
    assert all(p.grad is not None for p in method.parameters())
    assert step.image_raw.grad is not None and step.text_raw.grad is not None
    again = method.losses(SimpleNamespace(**{**vars(step), "generator": torch.Generator().manual_seed(5)}),
                          {"lite_prior"})
    assert again["lite_prior"].item() == parts["lite_prior"].item()


def test_lite_prior_state_restores_in_place():
    trained, fresh = prepared_lite_with_prior(), prepared_lite_with_prior()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    kept = fresh.parameters()
    fresh.load_state_dict(trained.state_dict())
    assert all(a is b for a, b in zip(fresh.parameters(), kept))
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), trained.parameters()))


def test_lite_with_model_logit_scale_has_no_parameters():
    plain = built_lite(config(lite_critic="logit-scale"))
    assert plain.parameters() == [] and plain.state_dict() == {}


def test_lite_default_critic_is_the_authors_heads_with_a_learned_temperature():
    from clipfit.losses import lite_loss

    method = built_lite(config())
    method.prepare(SimpleNamespace(loaded=SimpleNamespace(model_cfg={"embed_dim": 8}), model=None, pairs=[0, 1, 2],
                                   device=torch.device("cpu")))
    shortcut = method.heads["image"].shortcut.weight
    assert shortcut.shape == (2048, 8) and torch.equal(shortcut[:8, :8].diagonal(), torch.ones(8))
    assert shortcut[8:].abs().max() <= 0.01
    step = lite_step(0)
    got = method.losses(step, {"lite"})["lite"]
    heads = method.heads
    expected = lite_loss(heads["image"](step.image_raw), heads["text"](step.text_raw), 1 / INITIAL_TEMPERATURE)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)
    restored = built_lite(config())
    restored.prepare(SimpleNamespace(loaded=SimpleNamespace(model_cfg={"embed_dim": 8}), model=None,
                                     pairs=[0, 1, 2], device=torch.device("cpu")))
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.5)
    restored.load_state_dict(method.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.parameters(), method.parameters()))


# --- in-process runs: the teacher and LoRA ----------------------------------------------------

@pytest.fixture
def captured(monkeypatch):
    """Run clipfit.run.refine in-process, keeping the model, its starting state and the teacher."""
    seen = {}
    original_prepare = run_module.prepare_model

    def prepare_model(loaded, cfg, device):
        model = original_prepare(loaded, cfg, device)
        seen["model"], seen["start"] = model, copy.deepcopy(model)
        return model

    class RecordingTeacher(teacher_module.FrozenTeacher):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["teacher"] = self

    monkeypatch.setattr(run_module, "prepare_model", prepare_model)
    monkeypatch.setattr(teacher_module, "FrozenTeacher", RecordingTeacher)
    return seen


def refine_in_process(pairs, out, tiny_config, **settings):
    cfg = config(model=str(tiny_config), pretrained="none", out=str(out), batch_size=8, workers=0, quiet=True,
                 method="refine", **settings)
    return run_module.refine(str(pairs), cfg, ["refine", str(pairs)], Progress())


def sample_inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.randint(1, 400, (4, 16), generator=generator)


def test_full_teacher_gets_no_gradients_and_keeps_the_starting_weights(pairs_dir, tmp_path, tiny_config, captured):
    # --augment: no precomputed features, so the teacher runs at every step next to the student.
    info = refine_in_process(pairs_dir, tmp_path / "run", tiny_config, augment=True, lr=1e-3, epochs=2)
    teacher, start, student = captured["teacher"], captured["start"].state_dict(), captured["model"]
    assert teacher.forward_passes >= info["steps"] == 4
    for name, param in teacher.copy.named_parameters():
        assert not param.requires_grad and param.grad is None, name
        assert torch.equal(param, start[name]), name
    moved = [n for n, p in student.named_parameters() if not torch.equal(p.detach(), start[n])]
    assert moved, "the student should have trained"


def test_with_lora_only_adapters_change_and_the_teacher_is_the_adapter_free_start(pairs_dir, tmp_path,
                                                                                 tiny_config, captured):
    refine_in_process(pairs_dir, tmp_path / "run", tiny_config, lora=True, lr=1e-2, epochs=2)
    model, start, teacher = captured["model"], captured["start"], captured["teacher"]
    assert teacher.uses_adapters and teacher.copy is None
    start_state = start.state_dict()
    adapters_moved = False
    for name, param in model.named_parameters():
        if "lora_" in name:
            adapters_moved |= not torch.equal(param.detach(), start_state[name])
        elif ".attn.base_layer." in name:
            # peft adds and subtracts the deltas of nn.MultiheadAttention weights at every forward,
            # so these frozen weights move by float rounding only.
            assert torch.allclose(param, start_state[name], rtol=0, atol=1e-6) and not param.requires_grad, name
        else:
            assert torch.equal(param, start_state[name]) and not param.requires_grad, name
    assert adapters_moved
    images, texts = sample_inputs()
    model.eval()
    start.eval()
    with torch.no_grad():
        teacher_image, teacher_text = teacher.encode(images, texts)
        start_image, start_text = start.encode_image(images, normalize=False), start.encode_text(texts, normalize=False)
        student_image = model.encode_image(images, normalize=False)
    assert torch.allclose(teacher_image, start_image, atol=1e-5)
    assert torch.allclose(teacher_text, start_text, atol=1e-5)
    assert not torch.allclose(student_image, start_image, atol=1e-3), "adapters should be active outside the teacher"


# --- CLI runs ---------------------------------------------------------------------------------

def read_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_cli_refine_logs_rafa_and_hycd_and_starts_from_the_teacher(pairs_dir, tmp_path, tiny_config):
    out = tmp_path / "refine"
    run_cli(*tiny_refine_args(pairs_dir, out, tiny_config, "--method", "refine", "--hycd-alpha", "0",
                              "--val-split", "0.25"), check=True)
    rows = read_rows(out)
    assert all({"rafa", "hycd"} <= set(r) and "clip" not in r for r in rows)
    # Step 1 sees the untrained student, so with alpha 0 HyCD compares a model with itself.
    assert rows[0]["hycd"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["loss"] == pytest.approx(rows[0]["rafa"] + rows[0]["hycd"], rel=1e-5)
    report = (out / "report.md").read_text()
    assert "| rafa |" in report and "| hycd |" in report and "modality_gap" in report
    info = json.loads((out / "run.json").read_text())
    assert {"modality_gap", "image_to_text_R@1"} <= set(info["before"]) & set(info["after"])
    # --hycd-logits auto (the default) says what it chose and why, in run.json and the report
    chosen = info["methods"]["refine"]
    assert chosen["hycd_logits"] in ("raw-dot", "scaled-cos") and chosen["hycd_logits_probe"]["pairs"] == 12
    assert f"HyCD logits {chosen['hycd_logits']} (--hycd-logits auto)" in chosen["hycd_logits_reason"]
    assert chosen["hycd_logits_reason"] in report
    assert "modality_gap: L2 distance between the centroids of the normalised image and text embeddings" in report


def test_hycd_logits_probe_prefers_the_form_that_makes_the_teacher_right():
    from clipfit.methods.refine import probe_hycd_logits

    generator = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(16, 8, generator=generator), dim=-1)
    image = 3 * directions
    # captions point where their images do, but with norms that carry no meaning (0.1 to 10)
    meaningless = directions * torch.logspace(-1, 1, 16)[torch.randperm(16, generator=generator)][:, None]
    probe = probe_hycd_logits(image, meaningless, logit_scale=100.0, batch_size=8)
    assert probe["choice"] == "scaled-cos" and probe["scaled-cos"]["in_batch_top1"] == 1.0
    assert probe["raw-dot"]["in_batch_top1"] < 1.0
    # equal norms of 3: raw dot products are 9·cos, sharper than a logit scale of 2 would make them
    probe = probe_hycd_logits(image, 3 * directions, logit_scale=2.0, batch_size=8)
    assert probe["choice"] == "raw-dot" and probe["raw-dot"]["in_batch_top1"] == 1.0
    # the likelihood is the mean log-probability of the true pair: one batch of two, by hand
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    probe = probe_hycd_logits(a, b, logit_scale=1.0, batch_size=2)
    raw = [[2.0, 1.0], [0.0, 2.0]]  # a @ b.T
    by_hand = lambda m: 0.5 * sum(m[i][i] - math.log(sum(math.exp(x) for x in row)) for i, row in enumerate(m)) + \
        0.5 * sum(m[i][i] - math.log(sum(math.exp(m[j][i]) for j in range(2))) for i in range(2))  # noqa: E731
    assert probe["raw-dot"]["mean_log_prob_true_pair"] == pytest.approx(by_hand(raw) / 2, rel=1e-9)


def test_cli_lite_with_learned_critic_shuffle_and_prior(pairs_dir, tmp_path, tiny_config):
    out = tmp_path / "lite"
    run_cli(*tiny_refine_args(pairs_dir, out, tiny_config, "--method", "lite", "--lite-critic", "learned",
                              "--lite-negatives", "shuffle", "--lite-prior-weight", "0.25"), check=True)
    rows = read_rows(out)
    assert all({"lite", "lite_prior"} <= set(r) for r in rows)
    assert rows[0]["loss"] == pytest.approx(0.75 * rows[0]["lite"] + 0.25 * rows[0]["lite_prior"], rel=1e-5)
    report = (out / "report.md").read_text()
    assert "| lite |" in report and "| lite_prior |" in report and "learned_critic_scale" in report


def test_cli_refine_plus_lite_sums_weighted_terms(pairs_dir, tmp_path, tiny_config):
    out = tmp_path / "both"
    run_cli(*tiny_refine_args(pairs_dir, out, tiny_config, "--method", "refine+lite", "--weight", "clip=0.5",
                              "--weight", "rafa=2"), check=True)
    rows = read_rows(out)
    for row in rows:
        expected = 2 * row["rafa"] + row["hycd"] + row["lite"] + 0.5 * row["clip"]
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
    report = (out / "report.md").read_text()
    assert all(f"| {term} |" in report for term in ("rafa", "hycd", "lite", "clip"))
    assert "rafa=2" in report and "clip=0.5" in report


def test_lora_teacher_is_deterministic_while_the_student_trains():
    """The starter's MiniLM has dropout: the teacher (student with adapters off) must run without it."""
    from clipfit.models import apply_lora, evaluating, load_model, resolve_lora_targets

    loaded = load_model("lite0-minilm", None)
    tokens = loaded.tokenizer(["a red bicycle", "two cats asleep on a sofa"])
    with evaluating(loaded.model), torch.no_grad():
        start = loaded.model.encode_text(tokens)
    model = apply_lora(loaded.model, 4, 8.0, 0.0, resolve_lora_targets(loaded.model, "auto"))
    model.train()
    teacher = teacher_module.FrozenTeacher(model, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    first, second = teacher.encode(None, tokens)[1], teacher.encode(None, tokens)[1]
    assert torch.equal(first, second) and torch.allclose(first, start, atol=1e-5)
    assert model.training  # the student is left in training mode
