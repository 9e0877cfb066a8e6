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
