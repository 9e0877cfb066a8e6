"""A local Hugging Face cache laid out as huggingface_hub writes it, for loading with the hub off.

    HF_HOME/hub/models--ORG--NAME/snapshots/<revision>/<files>
    HF_HOME/hub/models--ORG--NAME/refs/main          holds <revision>

(datasets--ORG--NAME for a dataset repository.)
(huggingface_hub stores blobs and links snapshots to them; a plain file in the snapshot reads
the same.) Nothing here talks to a network.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"


def lay_out(hf_home: Path, repo_id: str, files: dict[str, Path], revision: str = REVISION,
            repo_type: str = "model") -> Path:
    """Put `files` (name in the repository -> file here) into the cache as `repo_id` at `revision`."""
    repo = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for name, source in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def offline_env(hf_home: Path, base: dict) -> dict:
    """The environment of a process that may only read `hf_home`'s cache."""
    env = {k: v for k, v in base.items() if not k.startswith(("HF_", "HUGGINGFACE", "TRANSFORMERS"))}
    env.update({"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


def closed_port() -> int:
    """A local port nothing listens on: a hub endpoint that refuses every connection."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
