import json

from conftest import run_cli, write_pairs


def test_methods_lists_every_registered_method_with_a_summary():
    from clipfit.methods import REGISTRY

    result = run_cli("methods", "--json")
    assert result.returncode == 0
    listed = json.loads(result.stdout)
    assert set(listed) == set(REGISTRY) and all(listed.values())


def test_data_check_json_reports_bad_images_and_long_captions(tmp_path):
    pairs = write_pairs(tmp_path / "pairs", n=4)
    (pairs / "img000.png").write_bytes(b"")
    (pairs / "img001.txt").write_text("word " * 100)
    result = run_cli("data", "check", pairs, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["usable_pairs"] == 3
    assert report["bad_images"][0]["path"].endswith("img000.png")
    assert "empty file" in report["bad_images"][0]["reason"]
    assert report["summary"]["captions_over_context"] == 1


def test_python_dash_m_and_version():
    result = run_cli("--version", subprocess_=True)
    assert result.returncode == 0 and result.stdout.startswith("clipfit ")



def test_refine_help_keeps_bracketed_defaults_in_option_texts():
    """rich reads "[default: …]" in a help text as markup and drops it unless the text is escaped."""
    words = run_cli("refine", "--help").stdout.replace("│", " ").split()
    text = " ".join(words)
    assert "runs/<method>-<time>]" in text and "1e-4 with --lora]" in text


def every_command() -> list[list[str]]:
    """The words that name each command and sub-command of the CLI."""
    import typer

    from clipfit.cli import app

    found = []

    def visit(command, words):
        found.append(words)
        for name, sub in getattr(command, "commands", {}).items():  # a group's sub-commands
            visit(sub, [*words, name])

    visit(typer.main.get_command(app), [])
    return found


def test_no_help_text_loses_its_bracketed_default(monkeypatch):
    """Every command's help: no option text ends in " ." (a "[default: …]" that rich took for markup
    and dropped), and every "[default:" written in a help text is shown."""
    from clipfit.cli import app  # noqa: F401 (every command registered)
    import typer

    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    commands = every_command()
    assert ["interpolate"] in commands and ["eval", "zeroshot"] in commands and ["push"] in commands
    for words in commands:
        result = run_cli(*words, "--help")
        assert result.returncode == 0, words
        lines = [line.rstrip(" │") for line in result.stdout.splitlines()]
        assert not [line for line in lines if line.endswith(" .")], (words, [l for l in lines if l.endswith(" .")])
        command = typer.main.get_command(app)
        for word in words:
            command = command.commands[word]
        written = sum((param.help or "").count("[default:") for param in command.params)
        assert result.stdout.count("[default:") >= written, words
