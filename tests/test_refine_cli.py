"""End to end: refine a tiny model, then reload what it wrote with open_clip itself."""

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from clipfit.data.layouts import load_pairs
from clipfit.data.training import split_val
from clipfit.eval.split import evaluate_split
from clipfit.models import load_model
from conftest import run_cli, tiny_refine_args, write_pairs


def rerun_after_metrics(model, loaded, run_info, pairs_dir):
    """The validation metrics of `model`, on the run's own validation split."""
    pairs = load_pairs(pairs_dir).pairs
    _, val = split_val(pairs, run_info["config"]["val_split"], run_info["config"]["seed"])
    return evaluate_split(model, val, loaded, torch.device("cpu"), 8)


@pytest.fixture(scope="module")
def contrastive_run(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("refine")
    pairs = write_pairs(root / "pairs", n=20, captions_per_image=2)
    out = root / "run"
    result = run_cli(*tiny_refine_args(pairs, out, tiny_config, "--epochs", "2", "--val-split", "0.2",
                                       "--lr", "1e-3", "--log-every", "1", "--json"))
    assert result.returncode == 0, result.stderr
    return pairs, out, json.loads(result.stdout)


def test_share_holds_every_output(contrastive_run):
    _, out, summary = contrastive_run
    for name in ("model.safetensors", "open_clip_config.json", "run.json", "metrics.jsonl", "report.md"):
        assert (out / name).is_file(), name
    assert summary["steps"] == 4  # 16 training pairs / batch 8 = 2 steps per epoch, 2 epochs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == [1, 2, 3, 4]
    assert all({"clip", "lr", "pairs_per_s", "epoch"} <= set(r) for r in step_rows)
    assert sum("val_clip_loss" in r for r in rows) == 2  # one validation line per epoch
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["epochs"] == 2 and run["resolved"]["lr"] == 1e-3
    assert run["data_hash"] and torch.__version__.startswith(run["environment"]["versions"]["torch"])
    assert "Before → after" in (out / "report.md").read_text()


def test_training_changed_the_weights(contrastive_run, tiny_config):
    _, out, _ = contrastive_run
    trained = load_file(str(out / "model.safetensors"))
    torch.manual_seed(0)  # refine seeds its random init with --seed 0
    start = load_model(str(tiny_config), "none").model.state_dict()
    assert set(trained) == set(start)
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_open_clip_reloads_the_weights_clipfit_trained(contrastive_run, tiny_config):
    pairs, out, _ = contrastive_run
    run_info = json.loads((out / "run.json").read_text())
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_config.stem, pretrained=str(out / "model.safetensors"))
    loaded = load_model(str(out))  # clipfit's own loader for the run folder (open_clip local-dir: underneath)
    loaded.preprocess_val = preprocess
    for candidate in (model, loaded.model):
        after = rerun_after_metrics(candidate, loaded, run_info, pairs)
        for name, value in after.items():  # run.json's after also holds the eval suite's group/set/metric keys
            assert run_info["after"][name] == pytest.approx(value, abs=1e-5), name


def test_existing_run_folder_is_refused_without_overwrite(contrastive_run, tiny_config):
    pairs, out, _ = contrastive_run
    result = run_cli(*tiny_refine_args(pairs, out, tiny_config, "--max-steps", "1"))
    assert result.returncode == 2
    assert "--overwrite" in result.stderr and "Traceback" not in result.stderr


def test_lora_run_saves_adapter_and_a_merged_model_that_matches(tmp_path, tiny_config):
    pairs = write_pairs(tmp_path / "pairs", n=20)
    out = tmp_path / "run"
    result = run_cli(*tiny_refine_args(pairs, out, tiny_config, "--lora", "--lora-rank", "4", "--lr", "1e-2",
                                       "--val-split", "0.2", "--epochs", "2"))
    assert result.returncode == 0, result.stderr
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["resolved"]["parameters"]["trainable"] < run_info["resolved"]["parameters"]["total"] / 5
    merged = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in merged)  # a plain open_clip state dict
    loaded = load_model(str(out))
    after = rerun_after_metrics(loaded.model, loaded, run_info, pairs)
    # run.json's "after" was measured on the unmerged peft model: the merge must not change it
    for name, value in after.items():
        assert run_info["after"][name] == pytest.approx(value, abs=1e-4), name


def test_toml_config_sets_values_and_flags_override_it(tmp_path, tiny_config):
    pairs = write_pairs(tmp_path / "pairs", n=16)
    config = tmp_path / "fit.toml"
    config.write_text(f'pairs = "{pairs}"\nmodel = "{tiny_config}"\npretrained = "none"\nbatch-size = 4\n'
                      "max_steps = 3\nlr = 0.002\nworkers = 0\n")
    out = tmp_path / "run"
    result = run_cli("refine", "--config", config, "--out", out, "--lr", "0.003", "--quiet")
    assert result.returncode == 0, result.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["batch_size"] == 4 and run["steps"] == 3
    assert run["config"]["lr"] == 0.003  # the flag beats the file


def test_unknown_toml_setting_is_a_usage_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("epochz = 3\n")
    result = run_cli("refine", "somewhere", "--config", config)
    assert result.returncode == 2
    assert "epochz" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_validation_images_are_encoded_once_per_measurement(tmp_path, tiny_config, monkeypatch):
    from clipfit.eval import encode

    pairs = write_pairs(tmp_path / "pairs", n=20)
    seen = []
    original = encode.ImageFiles.__getitem__
    monkeypatch.setattr(encode.ImageFiles, "__getitem__", lambda self, i: seen.append(self.paths[i]) or original(self, i))
    run_cli(*tiny_refine_args(pairs, tmp_path / "run", tiny_config, "--val-split", "0.2", "--epochs", "2"), check=True)
    # Before training, after each of the two epochs, after training: yardsticks and suite share one pass.
    assert len(seen) == 4 * 4 and len(set(seen)) == 4


SETS_DIGEST = "### Evaluation sets: top-1 and calibration"


def report_rows(report: str) -> list[tuple[str, ...]]:
    """(metric, before, after, change, verdict) of every before → after table in report.md, and each
    evaluation set's heading, in order."""
    section = report.split("## Before → after", 1)[1].split("\n## ", 1)[0]
    digest = section.split(SETS_DIGEST, 1)[1].split("\n### ", 1)[0] if SETS_DIGEST in section else ""
    section = section.replace(SETS_DIGEST + digest, "")  # the sets' top-1/ECE digest: the terminal leaves it out
    rows = []
    for line in section.splitlines():
        if line.startswith("### "):
            rows.append((line[4:],))
        elif line.startswith("| ") and not line.startswith("| metric |"):
            name, before, after, change = [cell.strip() for cell in line.strip("|").split("|")]
            number, _, verdict = change.partition(" (")
            rows.append((name, before, after, number, verdict.rstrip(")")))
    return rows


def test_terminal_summary_is_the_reports_table_each_metric_once(tmp_path, tiny_config, monkeypatch):
    pairs = write_pairs(tmp_path / "pairs", n=16)
    out = tmp_path / "run"
    monkeypatch.setenv("COLUMNS", "200")  # one line per row
    args = [a for a in tiny_refine_args(pairs, out, tiny_config, "--val-split", "0.25", "--lr", "1e-3",
                                        "--eval-retrieval", str(pairs)) if a != "--quiet"]
    result = run_cli(*args, check=True)
    table = result.stdout.split("before → after (validation)", 1)[1].splitlines()[2:]  # after the column heads
    printed = []
    for line in table:
        if line.startswith(("Rates", "report: ")):
            break
        words = line.split()
        printed.append((" · ".join(line.strip().split(" · ")),) if len(words) in (3, 1) and "·" in line
                       else (*words, "") if len(words) == 4 else tuple(words))
    expected = report_rows((out / "report.md").read_text())
    assert printed == expected
    names = [row[0] for row in printed if len(row) > 1]
    assert "text_to_image_R@1" not in names and "modality_gap" in names  # the gap once in each set's group
    assert {row[4] for row in printed if len(row) > 1} >= {"better", "worse"}
