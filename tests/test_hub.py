"""`hf-hub:` models: an unreachable hub fails at once, a cached model loads without it.

No test reaches the real hub: the endpoint is a closed local port or a local fake hub, and the
cache is a folder built here in huggingface_hub's layout.
"""

import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipfit import models
from conftest import TINY_CONFIG, cli_env


def hub_env(endpoint: str, hf_home: Path) -> dict:
    env = cli_env()
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN"):
        env.pop(name, None)
    return env


@pytest.fixture
def closed_port():
    """A local port that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize("model, label", [(["--model", "hf-hub:someone/some-clip"], "hf-hub:someone/some-clip"),
                                          (["--model", "RN50", "--pretrained", "openai"], "RN50/openai")])
def test_unreachable_hub_fails_at_once_with_one_line(model, label, closed_port, pairs_dir, tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port}"
    result = subprocess.run([sys.executable, "-m", "clipfit", "refine", str(pairs_dir), *model,
                             "--out", str(tmp_path / "run"), "--workers", "0", "--quiet"],
                            capture_output=True, text=True, env=hub_env(endpoint, tmp_path / "hf"), timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 4, result.stderr
    assert len(lines) == 1, result.stderr  # no traceback, no retry chatter from huggingface_hub
    assert f"could not load {label}" in lines[0]
    assert f"cannot reach {endpoint}" in lines[0] and "not in the local Hugging Face cache" in lines[0]


class FakeHub(BaseHTTPRequestHandler):
    """Serves the files in FILES as the hub does, and for the other repositories it is asked
    about, the answer the hub gives for their kind."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"
    FILES: dict[str, bytes] = {}  # "repo-name/filename" -> content
    ANSWERS = {"missing": (404, "RepoNotFound"), "gated": (403, "GatedRepo"), "not-clip": (404, "EntryNotFound"),
               "down": (503, None)}

    def do_HEAD(self):
        self.answer(with_body=False)

    def do_GET(self):
        self.answer(with_body=True)

    def answer(self, with_body: bool):
        match = re.fullmatch(r"/someone/([^/]+)/resolve/main/(.+)", self.path)  # else an /api/ call: none needed
        name, filename = match.groups() if match else ("", "")
        content = self.FILES.get(f"{name}/{filename}")
        status, error_code = (200, None) if content is not None else self.ANSWERS.get(name, (404, "EntryNotFound"))
        self.send_response(status)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.send_header("X-Repo-Commit", self.COMMIT)
        if content is not None:
            self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        self.send_header("Content-Length", str(len(content or b"")))
        self.end_headers()
        if with_body and content:
            self.wfile.write(content)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(tiny_config, tmp_path):
    """A local hub serving `someone/tiny` (the tiny test model, seeded weights); yields its address."""
    torch.manual_seed(5)
    weights = tmp_path / "served.safetensors"
    save_file({k: v.contiguous() for k, v in models.load_model(str(tiny_config), "none").model.state_dict().items()},
              str(weights))
    FakeHub.FILES = {"tiny/open_clip_config.json": json.dumps({"model_cfg": TINY_CONFIG}).encode(),
                     "tiny/open_clip_model.safetensors": weights.read_bytes()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


PROBE = """
import torch
from safetensors.torch import load_file
from clipfit.errors import ModelError
from clipfit.models import load_model
served = load_file({weights!r})
for name in {names!r}:
    try:
        loaded = load_model("hf-hub:someone/" + name)
        same = all(torch.equal(v, served[k]) for k, v in loaded.model.state_dict().items())
        print(name, "->", "loaded the served weights" if same else "loaded other weights")
    except ModelError as e:
        print(name, "->", e)
"""


def test_hub_answers_become_loads_or_one_line_reasons(fake_hub, tmp_path):
    names = ["tiny", *FakeHub.ANSWERS]
    code = PROBE.format(names=names, weights=str(tmp_path / "served.safetensors"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=hub_env(fake_hub, tmp_path / "hf"), timeout=300)
    reasons = dict(line.split(" -> ", 1) for line in result.stdout.splitlines())
    assert set(reasons) == set(names), result.stderr
    assert reasons["tiny"] == "loaded the served weights"
    assert "no such model" in reasons["missing"] and "private" in reasons["missing"]
    assert "is gated" in reasons["gated"]
    assert "not an open_clip model" in reasons["not-clip"]
    assert f"cannot reach {fake_hub}" in reasons["down"] and "not in the local Hugging Face cache" in reasons["down"]


def write_hub_cache(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> None:
    """What `hf download REPO` leaves in huggingface_hub's cache (files instead of blob links)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "open_clip_model.safetensors"))


@pytest.fixture
def no_network(monkeypatch, tmp_path) -> Path:
    """Sockets refuse to connect; huggingface_hub's cache is an empty folder, returned."""
    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_cached_hub_model_loads_without_the_hub(no_network, tiny_config):
    torch.manual_seed(3)
    state = models.load_model(str(tiny_config), "none").model.state_dict()
    write_hub_cache(no_network, "someone/cached-clip", state)
    loaded = models.load_model("hf-hub:someone/cached-clip")
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.context_length == TINY_CONFIG["text_cfg"]["context_length"]


def test_cached_config_without_weights_is_not_loaded_offline(no_network, tiny_config):
    # open_clip would build the model with random weights; offline, that must be an error instead
    write_hub_cache(no_network, "someone/half-cached", models.load_model(str(tiny_config), "none").model.state_dict())
    next(no_network.glob("models--someone--half-cached/snapshots/*/open_clip_model.safetensors")).unlink()
    with pytest.raises(models.ModelError, match="not in the local Hugging Face cache"):
        models.load_model("hf-hub:someone/half-cached")
