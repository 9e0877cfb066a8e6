"""`clipfit --help` and `clipfit data check` start without loading torch or open_clip.

Measured in benchmarks, never timed here: the test checks which modules a fresh interpreter
ends up with, which is what makes startup slow.
"""

import subprocess
import sys

from conftest import cli_env

HEAVY = ("torch", "open_clip", "open_clip_train", "peft", "faiss", "transformers", "timm")

PROBE = """
import sys
from clipfit.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


def heavy_modules_after(argv: list[str]) -> list[str]:
    code = PROBE.format(argv=argv, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    line = [l for l in result.stdout.splitlines() if l.startswith("HEAVY:")][-1]
    return [m for m in line.removeprefix("HEAVY:").split(",") if m]


def test_help_imports_no_heavy_module():
    assert heavy_modules_after(["--help"]) == []
    assert heavy_modules_after(["refine", "--help"]) == []


def test_data_check_help_imports_no_heavy_module():
    assert heavy_modules_after(["data", "check", "--help"]) == []


def test_data_check_of_short_captions_imports_no_heavy_module(pairs_dir):
    # every caption is provably within the context, so the tokenizer (and torch) stays unloaded
    assert heavy_modules_after(["data", "check", str(pairs_dir)]) == []
