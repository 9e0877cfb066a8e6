"""`--config FILE.toml`: every key and every value type is checked; nothing is dropped silently;
flags beat the file, including turning a boolean the file switched on back off.

Each case runs the real CLI. Runs that must get past configuration are pointed at a PAIRS
folder that does not exist: exit 3 ("no such file") then proves the configuration was accepted,
without training anything.
"""

from __future__ import annotations

import pytest

from conftest import error_line, run_main


def refine_with(tmp_path, toml: str, *flags: str) -> list:
    config = tmp_path / "fit.toml"
    config.write_text(toml)
    return ["refine", tmp_path / "missing-pairs", "--config", config, "--out", tmp_path / "run", *flags]


@pytest.mark.parametrize("toml, message", [
    ("epochs = 2.5", "epochs = 2.5 is a number; expected an integer"),
    ('epochs = "three"', 'epochs = "three" is a string; expected an integer'),
    ("epochs = true", "epochs = true is true/false; expected an integer"),
    ('lock-text = "yes"', 'lock_text = "yes" is a string; expected true or false'),
    ("lr = [1, 2]", "lr = [1, 2] is a list; expected a number"),
    ('weight = "rafa=0.5"', 'weight = "rafa=0.5" is a string; expected a list of strings'),
    ("[refine]\nout = 3", "out = 3 is an integer; expected a string"),
    ("pairs = 7", "pairs = 7 is an integer; expected a string"),
    ("epoch = 3", "unknown setting(s) epoch (did you mean epochs?)"),
    ("epochs = 1\n[refine]\nepochs = 2", "epochs is set twice (epochs at the top level and epochs in [refine]); keep one"),
    ("batch-size = 4\nbatch_size = 8", "batch_size is set twice (batch-size at the top level and batch_size at the top level)"),
    ("refine = 3", "refine must be a table ([refine]), not an integer"),
    ("[eval]\nepochs = 1", "unknown setting(s) eval"),
])
def test_bad_setting_is_named_with_the_expected_type(toml, message, tmp_path, capsys):
    capsys.readouterr()
    assert run_main(refine_with(tmp_path, toml)) == 2
    err = error_line(capsys)
    assert "fit.toml: " in err and message in err
    assert not (tmp_path / "run").exists()


def test_integers_are_accepted_where_numbers_are_expected(tmp_path, capsys):
    capsys.readouterr()
    assert run_main(refine_with(tmp_path, "lr = 1\nweight-decay = 0\nepochs = 2")) == 3
    assert "missing-pairs: no such file or folder" in error_line(capsys)


def test_top_level_keys_and_refine_table_are_both_read(tmp_path, capsys):
    # each half alone is valid; together they contradict, which only shows if neither is dropped
    capsys.readouterr()
    assert run_main(refine_with(tmp_path, "lora = true\n[refine]\nlock-image = true")) == 2
    assert "--lora freezes the base weights already" in error_line(capsys)
    assert run_main(refine_with(tmp_path, "lora = true")) == 3
    assert run_main(refine_with(tmp_path, "[refine]\nlock-image = true")) == 3


@pytest.mark.parametrize("toml, off", [
    ("lora = true\nlock-image = true", "--no-lock-image"),
    ("lora = true\nlock-image = true", "--no-lora"),
    ("resume = true\noverwrite = true", "--no-resume"),
    ("cache-images = true\naugment = true", "--no-augment"),
])
def test_a_boolean_set_in_the_file_is_turned_off_by_its_no_flag(toml, off, tmp_path, capsys):
    capsys.readouterr()
    assert run_main(refine_with(tmp_path, toml)) == 2  # contradictory as the file has it
    first = error_line(capsys)
    assert "contradict" in first or "use one or the other" in first
    assert run_main(refine_with(tmp_path, toml, off)) == 3  # one of them off: valid, reaches the data
    assert "no such file or folder" in error_line(capsys)


def test_existing_flag_spellings_still_work(tmp_path, capsys):
    capsys.readouterr()
    args = ["refine", tmp_path / "missing", "--lock-image", "--lock-text", "--no-precompute", "--precompute",
            "--augment", "--strict", "--quiet", "--json", "--no-json", "--out", tmp_path / "run"]
    assert run_main(args) == 3
    assert "no such file or folder" in error_line(capsys)


def test_config_that_is_a_folder_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "fit.toml").mkdir()
    capsys.readouterr()
    assert run_main(["refine", tmp_path, "--config", tmp_path / "fit.toml"]) == 2
    assert "fit.toml: cannot read config file (Is a directory)" in error_line(capsys)
