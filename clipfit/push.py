"""`clipfit push RUN_DIR ORG/NAME`: a run folder on the Hugging Face hub, in open_clip's layout.

The repository gets what `open_clip.push_to_hf_hub` writes (open_clip_config.json,
open_clip_model.safetensors, the tokenizer's files), a Hugging Face text tower's config.json,
the run's pictures and a README.md model card from run.json. A Hugging Face text tower and
tokenizer are named by the repository itself, so `hf-hub:ORG/NAME` needs nothing else.

Before anything is staged, the run's model is loaded as a user would load it (the safetensors
header, every tensor's shape against the folder's config) and its weights checked for NaN and
infinity: a damaged folder is exit 4, non-finite weights exit 5. Everything is then staged in a
folder (`--dry-run DIR` stops there) and uploaded in one commit, so a failed upload leaves the
repository as it was.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clipfit.errors import ModelError, TrainingError, UsageError
from clipfit.io import write_json, write_text
from clipfit.rundir import HF_TEXT_CONFIG, MODEL_FILE, OPEN_CLIP_CONFIG, is_run_dir, read_config

HUB_WEIGHTS = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME
PICTURES = ("loss_curves.png", "before_after.png")
STARTER_LICENCE = "apache-2.0"  # both packaged encoders of lite0-minilm


@dataclass
class PushRequest:
    run_dir: Path
    repo_id: str
    private: bool = False
    revision: str | None = None
    licence: str | None = None
    message: str | None = None


def check_repo_id(repo_id: str) -> None:
    owner, slash, name = repo_id.partition("/")
    if not slash or not owner or not name or "/" in name or repo_id.startswith("hf-hub:"):
        raise UsageError(f"{repo_id!r}: name the repository as ORG/NAME (or USER/NAME)")


def read_run(run_dir: Path) -> dict:
    if not is_run_dir(run_dir) or not (run_dir / MODEL_FILE).is_file() or not (run_dir / "run.json").is_file():
        raise UsageError(f"{run_dir}: not a finished clipfit run folder (needs {OPEN_CLIP_CONFIG}, {MODEL_FILE}, run.json)")
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    if "after" not in info:
        raise UsageError(f"{run_dir}: the run has not finished (run.json has no results); finish it with --resume")
    return info


def check_shippable(run_dir: Path) -> None:
    """A finished run (UsageError otherwise) whose model loads (ModelError, exit 4: truncated,
    damaged, or not the config's shapes) with finite weights (TrainingError, exit 5)."""
    from clipfit import models

    read_run(run_dir)
    loaded = models.load_model(str(run_dir))
    bad = models.non_finite_tensors(loaded.model.state_dict().items())
    if bad:
        raise TrainingError(f"{run_dir / MODEL_FILE}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {bad[0]}); "
                            "nothing was staged or uploaded")


def hub_config(run_dir: Path, repo_id: str) -> dict:
    """The run's open_clip config, a Hugging Face text tower and tokenizer pointing at the repository."""
    config = read_config(run_dir)
    text_cfg = dict(config["model_cfg"].get("text_cfg", {}))
    if text_cfg.get("hf_model_name") and (run_dir / HF_TEXT_CONFIG).is_file():
        text_cfg["hf_model_name"] = repo_id
    if text_cfg.get("hf_tokenizer_name"):
        text_cfg["hf_tokenizer_name"] = repo_id
    return {**config, "model_cfg": {**config["model_cfg"], "text_cfg": text_cfg}}


def base_model_id(model: dict) -> str | None:
    """The hub repository the starting weights came from, when there is one."""
    from clipfit.hub import HUB_PREFIX, tag_files

    arch, pretrained = str(model.get("arch", "")), str(model.get("pretrained", ""))
    if arch.startswith(HUB_PREFIX):
        return arch.removeprefix(HUB_PREFIX)
    try:
        files = tag_files(arch, pretrained)
    except Exception:  # not an open_clip architecture and tag: no hub origin to name
        return None
    return files.repo if files else None


def default_licence(info: dict) -> str:
    from clipfit.starter import STARTER_NAME

    return STARTER_LICENCE if info["model"].get("arch") == STARTER_NAME else "other"


def write_tokenizer(run_dir: Path, stage: Path) -> None:
    """What open_clip's push writes for a Hugging Face tokenizer: its save_pretrained files."""
    import open_clip

    from clipfit.models import quiet_load
    from clipfit.rundir import drop_load_time_keys

    if not read_config(run_dir)["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name"):
        return  # open_clip's own CLIP tokenizer ships with open_clip
    with quiet_load(offline=True):
        tokenizer = open_clip.get_tokenizer(f"local-dir:{run_dir}")
    tokenizer.save_pretrained(str(stage))
    drop_load_time_keys(stage / "tokenizer_config.json")


def stage_files(request: PushRequest, stage: Path) -> list[str]:
    """Write every file the repository gets into `stage`; return their names."""
    from clipfit import installed_version, model_card

    run_dir, info = request.run_dir, read_run(request.run_dir)
    stage.mkdir(parents=True, exist_ok=True)
    write_json(stage / OPEN_CLIP_CONFIG, hub_config(run_dir, request.repo_id))
    shutil.copyfile(run_dir / MODEL_FILE, stage / HUB_WEIGHTS)
    if (run_dir / HF_TEXT_CONFIG).is_file():
        shutil.copyfile(run_dir / HF_TEXT_CONFIG, stage / HF_TEXT_CONFIG)
    write_tokenizer(run_dir, stage)
    pictures = [name for name in PICTURES if (run_dir / name).is_file()]
    for name in pictures:
        shutil.copyfile(run_dir / name, stage / name)
    card = model_card.render(info, request.repo_id, request.licence or default_licence(info),
                             base_model_id(info["model"]), pictures, installed_version("clipfit"))
    write_text(stage / "README.md", card)
    return sorted(p.name for p in stage.iterdir())


def dry_run(request: PushRequest, folder: Path) -> list[str]:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"--dry-run {folder}: exists and is not an empty folder; choose a new one")
    check_shippable(request.run_dir)
    return stage_files(request, folder)


def push(request: PushRequest) -> str:
    """Upload the run in one commit; return the commit's URL. ModelError (exit 4) when the hub
    cannot be reached or refuses, with nothing uploaded."""
    check_shippable(request.run_dir)
    check_hub_reachable()
    with tempfile.TemporaryDirectory(prefix="clipfit-push-") as folder:
        names = stage_files(request, Path(folder))
        return upload(request, Path(folder), names)


def check_hub_reachable() -> None:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    from clipfit.hub import first_line

    if constants.is_offline_mode():
        raise ModelError("cannot push: HF_HUB_OFFLINE is set; nothing was uploaded "
                         "(unset it, or use --dry-run DIR to write the files)")
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:  # refused, no DNS, timeout, proxy: the types vary by version
        raise ModelError(f"cannot push: {constants.ENDPOINT} cannot be reached ({first_line(e)}); nothing was "
                         "uploaded (--dry-run DIR writes the files without uploading)") from e


def upload(request: PushRequest, stage: Path, names: list[str]) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    from clipfit.hub import first_line

    api = HfApi()
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(stage / name)) for name in names]
    try:
        api.create_repo(request.repo_id, private=request.private, exist_ok=True)
        if request.revision:
            api.create_branch(request.repo_id, branch=request.revision, exist_ok=True)
        commit = api.create_commit(request.repo_id, operations, revision=request.revision,
                                   commit_message=request.message or f"clipfit run {request.run_dir.name}")
    except Exception as e:  # auth, permissions, quota, network: huggingface_hub's errors say which
        raise ModelError(f"cannot push to {request.repo_id}: {first_line(e)}; the repository's files are unchanged "
                         "(log in with `hf auth login` or HF_TOKEN)") from e
    return commit.commit_url
