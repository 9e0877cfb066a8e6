"""Multi-positive targets through a real run: each item's positives group (class, or normalised
caption), the step's positives over the batch, `--multi-positive/--no-multi-positive` in run.json
and --resume, and the CLI on folders whose captions repeat or do not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env, repeat_captions, run_main, tiny_refine_args, write_pairs
from clipfit.data.dataset import caption_group, item_group
from clipfit.data.pairs import Pair
from clipfit.io import read_jsonl
from clipfit.losses import clip_loss
from test_grad_accum import one_batch, trainer_for


def test_a_caption_group_ignores_whitespace_and_case_only():
    assert caption_group(" A  red\tPicture\n") == caption_group("a red picture")
    assert caption_group("a red picture.") != caption_group("a red picture")
    assert 0 <= caption_group("a red picture") < 2**63  # an int64 for the batch tensor


def test_a_caption_group_is_the_same_in_another_process():
    """A torchrun rank or a resumed run computes it in its own interpreter (own hash seed)."""
    script = "from clipfit.data.dataset import caption_group; print(caption_group('a red picture'))"
    for seed in ("1", "2"):
        found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               env={**cli_env(), "PYTHONHASHSEED": seed})
        assert int(found.stdout) == caption_group("a red picture")


def test_a_labelled_pair_is_grouped_by_its_class_whatever_its_caption():
    labelled = [Pair(Path(f"{i}.png"), ("a photo of a cat", "a sketch of a cat"), f"{i}.png", label=3) for i in range(2)]
    assert item_group(labelled[0], 0) == item_group(labelled[1], 1) == 3
    plain = Pair(Path("x.png"), ("a cat", "A  CAT"), "x.png")
    assert item_group(plain, 0) == item_group(plain, 1) == caption_group("a cat")


def test_dataset_items_carry_their_group():
    from clipfit.data.dataset import PairDataset

    pairs = [Pair(Path("a.png"), ("A cat",), "a.png", label=1), Pair(Path("b.png"), ("a  dog", "A dog"), "b.png")]
    dataset = PairDataset(pairs, transform=None, tokenizer=lambda texts: torch.zeros(len(texts), 4), seed=0,
                          max_pixels=1)
    dataset.with_images = False  # as the loop reads a locked image tower's rows: groups travel all the same
    assert [dataset[(epoch, i)]["group"] for epoch in (0, 1) for i in (0, 1)] == [1, caption_group("a dog")] * 2


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> Path:
    """16 pairs, 4 captions written in different case and spacing: any 8 pairs repeat one."""
    folder = write_pairs(tmp_path_factory.mktemp("variants") / "pairs", n=16, size=24)
    for i, path in enumerate(sorted(folder.glob("img*.txt"))):
        caption = f"a {['red', 'green', 'blue', 'black'][i % 4]} picture"
        path.write_text((caption.upper().replace(" ", "  ") if i % 2 else caption) + "\n")
    return folder


def first_step(trainer):
    batch = one_batch([b for _, b in zip(range(4), trainer.loader(0, 0))])  # 4 micro-batches of 2
    images, texts = trainer.encoder_inputs(batch)
    with torch.no_grad():
        step = trainer.step_inputs([batch], images, texts, *trainer.encoder(images, texts))
    captions = [" ".join(trainer.dataset.pairs[i].captions[0].split()).lower() for i in batch["index"].tolist()]
    by_hand = torch.tensor([[a == b for b in captions] for a in captions])
    return step, by_hand


def test_the_steps_positives_are_its_rows_with_one_normalised_caption(variants, tiny_config, tmp_path):
    trainer = trainer_for(variants, tiny_config, tmp_path / "run", "contrastive")
    step, by_hand = first_step(trainer)
    assert by_hand.sum() > len(by_hand)  # the batch repeats a caption
    assert torch.equal(step.positives().cpu(), by_hand)
    with torch.no_grad():
        loss = trainer.methods.losses(step)["clip"]
    assert loss.item() == pytest.approx(clip_loss(step.image, step.text, step.logit_scale, by_hand).item(), rel=1e-6)


def test_no_multi_positive_gives_the_step_one_hot_targets(variants, tiny_config, tmp_path):
    trainer = trainer_for(variants, tiny_config, tmp_path / "run", "contrastive", multi_positive=False)
    step, by_hand = first_step(trainer)
    assert by_hand.sum() > len(by_hand) and step.groups is None and step.positives() is None
    with torch.no_grad():
        loss = trainer.methods.losses(step)["clip"]
    assert torch.equal(loss, clip_loss(step.image, step.text, step.logit_scale))


ALL_TERMS = ("--method", "refine+lite+ping", "--weight", "clip=1", "--ping-k", "2", "--max-steps", "2",
             "--log-every", "1", "--lr", "1e-3")


def test_without_repeats_multi_positive_trains_bit_for_bit_what_one_hot_targets_do(tiny_config, tmp_path):
    pairs = write_pairs(tmp_path / "pairs", n=16, size=24)  # every caption names its picture's number
    runs = {flag: tmp_path / flag.strip("-") for flag in ("--multi-positive", "--no-multi-positive")}
    for flag, out in runs.items():
        assert run_main(tiny_refine_args(pairs, out, tiny_config, *ALL_TERMS, flag,
                                         "--cache-dir", tmp_path / "cache")) == 0
    on, off = (load_file(out / "model.safetensors") for out in runs.values())
    assert all(torch.equal(on[name], off[name]) for name in on)
    logged = [[{k: v for k, v in row.items() if k != "pairs_per_s"} for row in read_jsonl(out / "metrics.jsonl")]
              for out in runs.values()]
    assert len(logged[0]) == 2 and logged[0] == logged[1]  # every term, exactly


@pytest.fixture(scope="module")
def repeated(tmp_path_factory, tiny_config):
    """A lite run (batch 8, 2 captions over 16 pairs) with and without multi-positive targets."""
    root = tmp_path_factory.mktemp("repeated")
    pairs = repeat_captions(write_pairs(root / "pairs", n=16, size=24), kinds=2)
    common = ("--method", "lite", "--max-steps", "1", "--epochs", "2", "--log-every", "1", "--lr", "1e-3")
    for name, flags in (("on", ()), ("off", ("--no-multi-positive",))):
        assert run_main(tiny_refine_args(pairs, root / name, tiny_config, *common, *flags)) == 0
    return pairs, root


def test_a_folder_whose_captions_repeat_trains_on_other_negatives(repeated):
    _, root = repeated
    configs = [json.loads((root / name / "run.json").read_text())["config"] for name in ("on", "off")]
    assert [c["multi_positive"] for c in configs] == [True, False]
    reports = [(root / name / "report.md").read_text() for name in ("on", "off")]
    assert "; multi-positive targets" in reports[0] and "; one-hot targets (--no-multi-positive)" in reports[1]
    losses = [read_jsonl(root / name / "metrics.jsonl")[0]["lite"] for name in ("on", "off")]
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)  # the rolled negative was often the same caption


def test_resume_refuses_a_changed_multi_positive_setting(repeated, tiny_config, capsys):
    pairs, root = repeated
    code = run_main(tiny_refine_args(pairs, root / "on", tiny_config, "--method", "lite", "--epochs", "2",
                                     "--lr", "1e-3", "--no-multi-positive", "--resume"))
    err = capsys.readouterr().err
    assert code == 2 and "--resume refused" in err and "multi_positive: True -> False" in err


def test_a_run_recorded_before_the_setting_resumes_with_one_hot_targets(repeated, tiny_config, tmp_path, capsys):
    pairs, root = repeated
    out = tmp_path / "older"
    assert run_main(tiny_refine_args(pairs, out, tiny_config, "--method", "lite", "--max-steps", "1",
                                     "--epochs", "2", "--lr", "1e-3", "--no-multi-positive")) == 0
    run_json = out / "run.json"
    recorded = json.loads(run_json.read_text())
    del recorded["config"]["multi_positive"]  # as a clipfit without the setting wrote it
    run_json.write_text(json.dumps(recorded))
    common = ("--method", "lite", "--epochs", "2", "--lr", "1e-3", "--resume")
    assert run_main(tiny_refine_args(pairs, out, tiny_config, *common)) == 2  # it trained one-hot
    assert "multi_positive: False -> True" in capsys.readouterr().err
    assert run_main(tiny_refine_args(pairs, out, tiny_config, *common, "--no-multi-positive")) == 0
    assert json.loads(run_json.read_text())["config"]["multi_positive"] is False
