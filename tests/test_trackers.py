"""--report-to: TensorBoard and Weights & Biases (offline) get the rows of metrics.jsonl, the config
and the pictures; real writers into a temporary folder, read back from their own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipfit.io import read_jsonl
from conftest import run_cli, tiny_refine_args, write_pairs


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_config):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    tmp = tmp_path_factory.mktemp("trackers")
    wandb_dir = tmp / "wandb-files"
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_DIR", str(wandb_dir))
    patch.setenv("WANDB_SILENT", "true")
    try:
        pairs = write_pairs(tmp / "pairs", n=24)
        out = tmp / "run"
        run_cli(*tiny_refine_args(pairs, out, tiny_config, "--val-split", "0.25", "--epochs", "2",
                                  "--log-every", "1", "--report-to", "tensorboard,wandb"), check=True)
    finally:
        patch.undo()
    return out, wandb_dir


def metrics_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return [r for r in rows if "loss" in r], [r for r in rows if "val_clip_loss" in r]


def test_tensorboard_events_hold_every_metrics_row_the_config_and_the_pictures(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tracked_run
    steps, epochs = metrics_rows(run_dir)
    assert len(steps) >= 2 and len(epochs) == 2
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in steps]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    val = events.Scalars("val/text_to_image_R@1")
    assert [e.step for e in val] == [r["step"] for r in epochs]
    assert [e.value for e in val] == pytest.approx([r["val_text_to_image_R@1"] for r in epochs])
    assert {"loss_curves", "before_after"} <= set(events.Tags()["images"])
    assert events.Images("loss_curves")[0].width > 100
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"report_to": "tensorboard,wandb"' in config_text
    hparams = events.PluginTagToContent("hparams")
    assert hparams, "no hyper-parameters were written"


def test_wandb_offline_run_holds_the_rows_the_config_and_the_pictures(tracked_run):
    run_dir, wandb_dir = tracked_run
    steps, epochs = metrics_rows(run_dir)
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run in {wandb_dir}"
    records = wandb_records(next(runs[0].glob("run-*.wandb")))
    history = history_rows(records)
    logged_loss = [r for r in history if "train/loss" in r]
    assert [r["_step"] for r in logged_loss] == [r["step"] for r in steps]
    assert [r["train/loss"] for r in logged_loss] == pytest.approx([r["loss"] for r in steps])
    logged_val = [r for r in history if "val/clip_loss" in r]
    assert [r["_step"] for r in logged_val] == [r["step"] for r in epochs]
    assert [r["val/clip_loss"] for r in logged_val] == pytest.approx([r["val_clip_loss"] for r in epochs])
    config = config_values(records)
    assert config["report_to"] == "tensorboard,wandb" and config["epochs"] == 2
    pictures = [r for r in history if "loss_curves/path" in r]  # nested values arrive flattened
    assert len(pictures) == 1 and pictures[0]["before_after/_type"] == "image-file"
    assert (runs[0] / "files" / pictures[0]["loss_curves/path"]).stat().st_size == pictures[0]["loss_curves/size"]


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb run file: a ':W&B' header, then LevelDB-log framing
    (32 KiB blocks; each chunk has a 4-byte checksum, 2-byte length and 1-byte type)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending, records = 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        if left < 7 or (length == 0 and kind == 0):  # block trailer padding
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_rows(records: list) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def config_values(records: list) -> dict:
    items = [item for r in records if r.WhichOneof("record_type") in ("run", "config")
             for item in (r.run.config.update if r.WhichOneof("record_type") == "run" else r.config.update)]
    return {item.key: json.loads(item.value_json) for item in items}


def test_a_tracker_that_is_not_installed_is_one_line_before_anything_runs(tmp_path, tiny_config, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    pairs = write_pairs(tmp_path / "pairs", n=8)
    result = run_cli(*tiny_refine_args(pairs, tmp_path / "run", tiny_config, "--report-to", "wandb"))
    assert result.returncode == 2
    assert result.stderr.strip() == ("clipfit: error: --report-to wandb: the wandb package is not installed "
                                     "(pip install 'clipfit[wandb]', or drop it from --report-to)")
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_a_usage_error(tmp_path, tiny_config):
    pairs = write_pairs(tmp_path / "pairs", n=8)
    result = run_cli(*tiny_refine_args(pairs, tmp_path / "run", tiny_config, "--report-to", "mlflow"))
    assert result.returncode == 2 and "--report-to 'mlflow'" in result.stderr
