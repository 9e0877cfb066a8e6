"""End to end: `clipfit eval ...` on generated folders, refine's before/after and gate, compare.

The eval commands run in-process through clipfit.cli.main (a subprocess costs seconds of
imports on a 2-core machine); refine runs as a user would, in a subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, tiny_refine_args, write_pairs
from test_eval_zeroshot import write_image_folder

TINY = ("--pretrained", "none", "--workers", "0", "--batch-size", "8", "--device", "cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-data")
    return {"images": write_image_folder(root / "classes", per_class=4),
            "pairs": write_pairs(root / "pairs", n=12, captions_per_image=2)}


def clipfit(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit status, stdout, stderr)."""
    from clipfit.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def eval_json(capsys, *args: str) -> dict:
    status, out, err = clipfit(capsys, "eval", *args, "--json")
    assert status == 0, err
    return json.loads(out)


def test_eval_commands_write_clip_benchmark_json(tiny_config, folders, tmp_path, capsys):
    out = tmp_path / "zs.json"
    zs = eval_json(capsys, "zeroshot", "folder", "--data", str(folders["images"]), "--model", str(tiny_config), *TINY,
                   "--out", str(out))
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(zs)
    assert zs["task"] == "zeroshot_classification" and zs["dataset"] == "classes" and zs["model"] == "tiny-test"
    assert 0 <= zs["metrics"]["acc1"] <= zs["metrics"]["acc5"] <= 1  # fractions, as CLIP_benchmark writes them
    assert json.loads(out.read_text()) == zs

    retrieval = eval_json(capsys, "retrieval", str(folders["pairs"]), "--model", str(tiny_config), *TINY)
    assert retrieval["task"] == "zeroshot_retrieval" and retrieval["clipfit"] == {"images": 12, "captions": 24}
    for direction in ("image", "text"):
        recalls = [retrieval["metrics"][f"{direction}_retrieval_recall@{k}"] for k in (1, 5, 10)]
        assert 0 <= recalls[0] <= recalls[1] <= recalls[2] <= 1
    assert "modality_gap" in retrieval["metrics"]

    probe = eval_json(capsys, "linear-probe", "--data", str(folders["images"]), "--model", str(tiny_config), *TINY)
    assert probe["task"] == "linear_probe" and 0 <= probe["metrics"]["lp_acc1"] <= 1


def test_eval_table_and_bad_input(tiny_config, folders, tmp_path, capsys):
    status, out, _ = clipfit(capsys, "eval", "geometry", folders["pairs"], "--model", tiny_config, *TINY)
    assert status == 0 and "modality_gap_mse" in out and "uniformity_text" in out
    status, _, err = clipfit(capsys, "eval", "zeroshot", "cifar10", "--data", tmp_path, "--model", tiny_config, *TINY)
    assert status == 3 and "never downloads" in err and len(err.splitlines()) == 1
    status, _, err = clipfit(capsys, "eval", "zeroshot", "mnist", "--data", tmp_path, "--model", tiny_config, *TINY)
    assert status == 2 and "mnist" in err


def refine_with_gate(tiny_config, folders, out: Path, points: str):
    args = tiny_refine_args(folders["pairs"], out, tiny_config, "--val-split", "0.25", "--max-steps", "1",
                            "--eval-zeroshot", f"folder={folders['images']}", "--eval-retrieval", str(folders["pairs"]),
                            "--fail-on-zeroshot-drop", points)
    return run_cli(*args)


def test_refine_before_after_and_gate_passing(tiny_config, folders, tmp_path, capsys):
    result = refine_with_gate(tiny_config, folders, tmp_path / "run", "100")  # a 100-point drop is always allowed
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    for key in ("zeroshot/classes/acc1", "retrieval/validation/text_retrieval_recall@1", "retrieval/pairs/text_retrieval_mrr"):
        assert key in info["before"] and key in info["after"]
        assert info["delta"][key] == pytest.approx(info["after"][key] - info["before"][key])
    assert info["gate"]["passed"] is True
    report = (tmp_path / "run" / "report.md").read_text()
    assert "### zeroshot · classes" in report and "![Loss curves](loss_curves.png)" in report
    for picture in ("loss_curves.png", "before_after.png"):
        assert (tmp_path / "run" / picture).read_bytes().startswith(b"\x89PNG")
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "src=\"loss_curves.png\"" not in html

    status, out, _ = clipfit(capsys, "compare", tmp_path / "run", tmp_path / "run", "--json")
    table = json.loads(out)
    assert len(table["runs"]) == 2 and "zeroshot/classes/acc1" in table["metrics"]


def test_gate_failure_exits_6_after_saving_everything(tiny_config, folders, tmp_path):
    result = refine_with_gate(tiny_config, folders, tmp_path / "run", "-100")  # demands a 100-point rise: impossible
    assert result.returncode == 6, result.stderr
    assert "--fail-on-zeroshot-drop -100" in result.stderr and "classes" in result.stderr
    for saved in ("model.safetensors", "run.json", "report.md", "report.html"):
        assert (tmp_path / "run" / saved).is_file()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["gate"]["passed"] is False
