"""The run-folder contract: what makes a folder a clipfit run, what clipfit may replace in it,
and who may write it.

- A clipfit run folder holds the marker file `.clipfit-run` (written first, when clipfit makes a
  folder a run folder) and `run.json`. clipfit only ever replaces such a folder, and in it only the
  entries named in `OWN_NAMES` (what a run writes); anything else in the folder stays.
- A sweep folder (`clipfit sweep --out`) follows the same contract, with its own names
  (`SWEEP_NAMES`, and the grid-point run folders it made); the marker's first line says which
  kind a folder is, and a folder of one kind is never claimed as the other.
- A folder that is not empty and has no marker is never written to, with or without --overwrite.
- `--out` may not be, contain, or lie inside PAIRS or the cache folder, nor be the current folder
  or one of its parents; this is checked (symlinks resolved) before anything is touched.
- A run holds an exclusive lock (`fcntl.flock` on the marker, which also holds its pid) for its
  whole life; the OS drops it when the process ends, however it ends. A forked child (a DataLoader
  worker) closes its copy of the descriptor at once, so no other process can keep the lock alive.
- --overwrite is staged: the previous run's entries move into `.clipfit-replaced/` and are
  deleted only once the new run has written its run.json. Until then any failure, or the next
  clipfit run on the folder after a kill, moves them back (`recover`). A sweep commits sooner:
  once every grid point's settings are checked, before its first run, since a rerun of the same
  command continues rather than replaces it.

What a run folder holds for loading, so that it works anywhere (README, "What you get in a run
folder"):
  open_clip_config.json   model_cfg + preprocess_cfg in open_clip's format, plus a `clipfit` block
                          (architecture and starting weights by name) that open_clip ignores
  model.safetensors       the full state dict with open_clip's key names
  tokenizer files         what `save_pretrained` writes, for a Hugging Face tokenizer:
                          `open_clip.get_tokenizer("local-dir:RUN")` reads them from the folder
  config.json             a Hugging Face text tower's transformers config

No file a loader reads holds an absolute path: a text tower that was built from a local folder
is named by its hub id (the starter's MiniLM: sentence-transformers/all-MiniLM-L6-v2) or, when
clipfit cannot know one, by the folder's name. open_clip 3.3 builds a Hugging Face text tower
from `text_cfg.hf_model_name` (a hub id or a path), never from the local-dir folder, so plain
open_clip needs that model's config.json from the hub or the local Hugging Face cache (one
small file; all weights come from model.safetensors). clipfit needs nothing outside the folder:
it builds such a tower from the folder's config.json, through the same `local-dir:` loader.

run.json and report.md are records, not loader inputs: they may name where the data and the
starting model came from on the machine that made the run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from clipfit import installed_version
from clipfit.config import RESULT_NEUTRAL, RefineConfig, saved_settings
from clipfit.errors import ModelError, OutputError, UsageError
from clipfit.io import write_json, write_text
from clipfit.progress import printable
from clipfit.trackers import TENSORBOARD_DIR, WANDB_DIR  # --report-to writers

if TYPE_CHECKING:  # rundir stays free of the data modules' imports (PIL, numpy)
    from clipfit.data.check import CheckReport

MARKER = ".clipfit-run"
STAGING = ".clipfit-replaced"  # the replaced run's entries, until the new run has its run.json
DISCARDED = ".clipfit-discarded"  # a committed STAGING, renamed before it is deleted
STAGED_ALL = ".staged"  # in STAGING: every entry has moved in (absent: staging was cut short)
RESTORING = ".restoring"  # in STAGING: the new run was abandoned, entries are moving back
WRITE_PROBE = ".write-test"

RUN_JSON = "run.json"
SKIPPED_TXT = "skipped.txt"
METRICS_JSONL = "metrics.jsonl"
MODEL_FILE = "model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's own `local-dir:` format
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
REPORT_MD, REPORT_HTML = "report.md", "report.html"
LOSS_CURVES, BEFORE_AFTER = "loss_curves.png", "before_after.png"
PING_HEADS = "ping_heads.safetensors"
DCLIP_TEACHER = "teacher.safetensors"
LITE_CRITIC = "lite_critic.safetensors"
LAST_MODEL = "last.safetensors"  # --select-best: the last step's weights
SELECTION_PLOT = "selection.png"
CONFUSION_PLOT = "confusion.png"  # a folder of classes: the confusion matrices before and after
EVAL_SAMPLE = "eval-sample"
HF_TEXT_CONFIG = "config.json"  # transformers' name for a model config: a Hugging Face text tower's
# What `save_pretrained` may write for a Hugging Face tokenizer: open_clip reads them from the folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja")

# Everything a run writes into its folder; --overwrite replaces these and nothing else.
OWN_NAMES = frozenset({RUN_JSON, SKIPPED_TXT, METRICS_JSONL, MODEL_FILE, OPEN_CLIP_CONFIG, ADAPTER_DIR,
                       CHECKPOINT_DIR, REPORT_MD, REPORT_HTML, LOSS_CURVES, BEFORE_AFTER, PING_HEADS,
                       DCLIP_TEACHER, LITE_CRITIC, LAST_MODEL, SELECTION_PLOT, CONFUSION_PLOT, EVAL_SAMPLE, WRITE_PROBE, TENSORBOARD_DIR, WANDB_DIR,
                       HF_TEXT_CONFIG, *TOKENIZER_FILES})
HOUSEKEEPING = frozenset({MARKER, STAGING, DISCARDED})

# What a sweep writes into its folder, besides the run folders it makes: its grid points
# (`grid_point_name`), its soups (SOUP_DIR) and the WiSE-FT of its choice (WISE_DIR).
SWEEP_JSON, SWEEP_MD, SWEEP_HTML, SWEEP_PNG = "sweep.json", "sweep.md", "sweep.html", "sweep.png"
SWEEP_NAMES = frozenset({SWEEP_JSON, SWEEP_MD, SWEEP_HTML, SWEEP_PNG, WRITE_PROBE})
SOUP_DIR, WISE_DIR = "soup-{recipe}", "wise"
SOUP_RECIPES = ("uniform", "greedy", "stock")
# exactly the names a sweep gives (a grid point is NN-setting=value…): not a `clipfit soup --out` of another name
SWEEP_RUN = re.compile(rf"\d{{2,}}-[a-z0-9-]+=.+|soup-(?:{'|'.join(SOUP_RECIPES)})|{WISE_DIR}")
INTERPOLATED = "-wise"  # `clipfit interpolate RUN`'s default --out: RUN-wise, beside RUN


def is_own(name: str, names: frozenset[str] = OWN_NAMES) -> bool:
    """A name clipfit writes into a run folder (or, given SWEEP_NAMES, a sweep folder): its files,
    and the temporary names of their atomic writes (`.NAME.XXXX.tmp`, clipfit.io; safetensors'
    own `.tmpXXXXXX` beside it) and of the LoRA adapter (`.adapter.XXXX`)."""
    if name in names or SAFETENSORS_TEMPORARY.fullmatch(name):
        return True
    if is_temporary(name):
        return name[1:].rsplit(".", 2)[0] in names
    return name.startswith(f".{ADAPTER_DIR}.")


SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # safetensors writes here, then renames


def is_temporary(name: str) -> bool:
    """The name of a write in progress, left behind by a kill: an atomic write's (clipfit.io.atomic_path)
    or the file safetensors' writer fills beside its target before renaming it."""
    return (name.startswith(".") and name.endswith(".tmp")) or bool(SAFETENSORS_TEMPORARY.fullmatch(name))


def grid_point_name(index: int, label: str) -> str:
    """The folder of a sweep's grid point: its number, then what sets it apart."""
    return f"{index:02d}-{label}"


def is_sweep_run(path: Path) -> bool:
    """A run folder a sweep made in its folder: a grid point's, a soup's or the WiSE-FT's name, and
    the marker inside; not `clipfit interpolate`'s default output for a grid point beside it."""
    if not (SWEEP_RUN.fullmatch(path.name) and path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()):
        return False
    name = path.name
    return not (name.endswith(INTERPOLATED) and (path.parent / name[:-len(INTERPOLATED)]).is_dir())


@dataclass(frozen=True)
class FolderKind:
    """A kind of folder clipfit makes: what it writes there and how a rerun treats it."""

    name: str  # "run" or "sweep": the marker's first line names it
    record: str  # the file that holds the folder's results
    names: frozenset[str]  # what it writes at the top of the folder
    rerun_continues: bool  # the same command continues it (a sweep), or only --resume does (a run)
    made_folders: Callable[[Path], bool] = lambda path: False  # sub-folders it made

    def owns(self, path: Path) -> bool:
        return is_own(path.name, self.names) or self.made_folders(path)


RUN = FolderKind("run", RUN_JSON, OWN_NAMES, rerun_continues=False)
SWEEP = FolderKind("sweep", SWEEP_JSON, SWEEP_NAMES, rerun_continues=True, made_folders=is_sweep_run)


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method.replace('+', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


def listing(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- where --out may be ---------------------------------------------------------------------

def check_location(out: Path, protected: dict[str, Path]) -> None:
    """Refuse an --out that is, contains or lies inside a protected path (PAIRS, the cache
    folder), or that is the current folder or one of its parents; symlinks resolved."""
    if out.is_symlink() and not out.exists():
        raise UsageError(f"{out}: --out is a symlink to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: --out is a file, not a folder; choose a folder for the run")
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UsageError(f"{out}: --out is the current folder{'' if target == cwd else ' or a parent of it'}; "
                         "choose a folder of its own for the run (e.g. runs/NAME)")
    for what, path in protected.items():
        where = path.resolve()
        if target == where or where in target.parents or target in where.parents:
            relation = "is" if target == where else "lies inside" if where in target.parents else "contains"
            raise UsageError(f"{out}: --out {relation} {what} ({path}); choose a folder of its own for the run")


def pairs_on_disk(pairs_path: str) -> Path | None:
    """The path PAIRS names on disk (a folder, a CSV, or the folder of a shard pattern)."""
    path = Path(pairs_path)
    if path.exists():
        return path
    if "{" in pairs_path and path.parent.exists():  # webdataset brace pattern: shards/{000..009}.tar
        return path.parent
    return None


# --- the lock ----------------------------------------------------------------------------------

HELD: set[int] = set()  # descriptors of the markers this process holds locked


def forget_locks_in_child() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors. flock belongs
    to the open file, which fork shares, so a child that kept it would hold the lock after the run
    died; closing it here leaves the lock to the parent alone."""
    for fd in HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    HELD.clear()


os.register_at_fork(after_in_child=forget_locks_in_child)


def lock_folder(path: Path, kind: FolderKind = RUN) -> int:
    """Create the marker if needed and hold an exclusive lock on it; the OS drops the lock with the
    process. Returns the open descriptor (closing it releases the lock). A folder whose marker names
    the other kind is refused."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"{path}: cannot write to the {kind.name} folder ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutputError(f"{path}: cannot lock the {kind.name} folder ({e.strerror or e})") from None
        raise UsageError(f"{path}: in use by another clipfit {marked_kind(path) or kind.name} ({holder(path)}); "
                         "wait for it to finish or choose another --out") from None
    HELD.add(fd)
    found = marked_kind(path)
    if found not in (None, kind.name):
        release_lock(fd)
        raise UsageError(f"{path}: a clipfit {found} folder, not a {kind.name} folder; choose another --out")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{marker_title(kind)}\npid {os.getpid()}\n".encode())
    except OSError as e:  # a full disk: the marker's few bytes do not fit
        release_lock(fd)
        raise OutputError(f"{path}: cannot write the {kind.name} folder's marker ({e.strerror or e})") from None
    return fd


def release_lock(fd: int) -> None:
    HELD.discard(fd)
    os.close(fd)


def marker_title(kind: FolderKind) -> str:
    return f"clipfit {kind.name} folder"


def marked_kind(path: Path) -> str | None:
    """The kind the marker names (None: a marker clipfit is only now writing)."""
    try:
        first = (path / MARKER).read_text(encoding="utf-8").partition("\n")[0]
    except (OSError, UnicodeDecodeError):
        return None
    return next((k.name for k in (RUN, SWEEP) if first == marker_title(k)), None)


def holder(path: Path) -> str:
    for _ in range(20):  # the holder writes its pid right after it gets the lock
        try:
            for line in (path / MARKER).read_text(encoding="utf-8").splitlines():
                if line.startswith("pid "):
                    return f"pid {line.split()[1]}"
        except OSError:
            pass
        time.sleep(0.05)
    return "pid unknown"


# --- staged replacement --------------------------------------------------------------------------

def own_entries(path: Path, kind: FolderKind = RUN) -> list[Path]:
    return [p for p in path.iterdir() if kind.owns(p)]


def foreign_entries(path: Path, kind: FolderKind = RUN) -> list[Path]:
    return [p for p in path.iterdir() if not kind.owns(p) and p.name not in HOUSEKEEPING]


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def stage(path: Path, kind: FolderKind = RUN) -> Path | None:
    """Move clipfit's own entries into STAGING (the record last, so that a folder with its record at
    the top still holds the whole previous run); the sentinel says every entry made it."""
    entries = sorted(own_entries(path, kind), key=lambda p: p.name == kind.record)
    if not entries:
        return None
    staging = path / STAGING
    staging.mkdir()
    for entry in entries:
        os.replace(entry, staging / entry.name)
    (staging / STAGED_ALL).write_bytes(b"")
    return staging


def restore(path: Path, kind: FolderKind = RUN) -> None:
    """Move the staged previous run back (its record last) and drop STAGING."""
    staging = path / STAGING
    if (staging / STAGED_ALL).exists():  # the new run's partial entries go first: they are worthless
        for entry in own_entries(path, kind):
            remove(entry)
        os.replace(staging / STAGED_ALL, staging / RESTORING)
    for entry in sorted(staging.iterdir(), key=lambda p: p.name == kind.record):
        if entry.name not in (STAGED_ALL, RESTORING):
            os.replace(entry, path / entry.name)
    shutil.rmtree(staging)


def discard_staged(path: Path) -> None:
    """The new run has its run.json: the previous run's entries go (renamed first, so that a kill
    half-way through the deletion cannot look like an unfinished replacement)."""
    if (path / STAGING).exists():
        os.replace(path / STAGING, path / DISCARDED)
    if (path / DISCARDED).exists():
        shutil.rmtree(path / DISCARDED)


def recover(path: Path, warn: Callable[[str], None], kind: FolderKind = RUN) -> None:
    """Finish what a killed --overwrite left: keep the new run if it has its record, else put
    the previous run back."""
    staging = path / STAGING
    if (path / DISCARDED).exists():
        discard_staged(path)
    if not staging.exists():
        return
    if (staging / STAGED_ALL).exists() and (path / kind.record).exists():
        discard_staged(path)
        warn(f"{path}: finished replacing the previous {kind.name}, which an interrupted --overwrite had left in {STAGING}")
    else:
        restore(path, kind)
        warn(f"{path}: an interrupted --overwrite left the previous {kind.name} in {STAGING}; it is back in place")


def drop_temporaries(path: Path) -> None:
    """Half-written files that a killed process left (atomic writes never renamed into place, in
    the folder and among its checkpoints): the folder is locked, so nobody is writing them."""
    for folder in (path, path / CHECKPOINT_DIR):
        if folder.is_dir():
            for entry in folder.iterdir():
                if is_temporary(entry.name) or entry.name.startswith(f".{ADAPTER_DIR}."):
                    remove(entry)


def folder_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@dataclass
class RunFolder:
    """A locked run (or sweep) folder (the lock lasts until `release`, or the process ends)."""

    path: Path
    fd: int | None
    kind: FolderKind = RUN

    def commit(self) -> None:
        """The new run has written its run.json: a replaced run's staged entries can go."""
        discard_staged(self.path)

    def abandon(self) -> None:
        """The new run failed before its run.json: a replaced run comes back; the lock goes."""
        try:
            if (self.path / STAGING).exists():
                restore(self.path, self.kind)
        finally:
            self.release()

    def release(self) -> None:
        if self.fd is not None:
            release_lock(self.fd)
            self.fd = None


def claim_run_dir(out: Path, resume: bool, overwrite: bool, protected: dict[str, Path],
                  warn: Callable[[str], None]) -> RunFolder:
    """Check, lock and prepare the run folder for a new run (staging a replaced one) or a resumed one."""
    return claim_folder(out, RUN, resume, overwrite, protected, warn)


def claim_sweep_dir(out: Path, overwrite: bool, protected: dict[str, Path], warn: Callable[[str], None]) -> RunFolder:
    """Check, lock and prepare a sweep folder: continued as it is, or replaced (staged) under --overwrite."""
    return claim_folder(out, SWEEP, not overwrite, overwrite, protected, warn)


def claim_folder(out: Path, kind: FolderKind, resume: bool, overwrite: bool, protected: dict[str, Path],
                 warn: Callable[[str], None]) -> RunFolder:
    check_location(out, protected)
    refuse_foreign(out, kind, resume)
    folder = RunFolder(out, lock_folder(out, kind), kind)
    try:
        recover(out, warn, kind)
        prepare_locked(folder, resume, overwrite, warn)
        probe_writable(out, kind)
    except OSError as e:
        folder.abandon()
        raise OutputError(f"{out}: cannot prepare the {kind.name} folder ({e.strerror or e})") from None
    except BaseException:
        folder.abandon()
        raise
    return folder


def refuse_foreign(out: Path, kind: FolderKind, resume: bool) -> None:
    """Before anything is written: a non-empty folder without the marker is not clipfit's."""
    if not out.is_dir() or (out / MARKER).exists():
        return
    found = [p.name for p in out.iterdir()]
    # resume adopts a run made before the marker
    if not found or (kind is RUN and resume and (out / RUN_JSON).is_file()):
        return
    legacy = " (it has a run.json: a run folder of clipfit 0.1.0? move it away or delete it yourself)" \
        if kind is RUN and RUN_JSON in found else ""
    raise UsageError(f"{out}: not empty and not a clipfit {kind.name} folder (found {listing(found)}){legacy}; "
                     "clipfit never replaces files it did not write: choose a new --out")


def prepare_locked(folder: RunFolder, resume: bool, overwrite: bool, warn: Callable[[str], None]) -> None:
    out, kind = folder.path, folder.kind
    has_record = (out / kind.record).is_file()
    if resume:
        if not (has_record or kind.rerun_continues):
            raise UsageError(f"{out}: nothing to resume (no {RUN_JSON}); run without --resume")
        drop_temporaries(out)
        return
    if has_record and not overwrite:
        raise UsageError(f"{out}: run folder exists; pass --overwrite to replace it or --resume to continue it")
    refuse_foreign_inside(out, kind)
    kept = foreign_entries(out, kind)
    staged = stage(out, kind)  # a replaced run, or the leftovers of a run that failed while setting up
    if kept and staged is not None:
        warn(f"{out}: kept {len(kept)} entr{'y' if len(kept) == 1 else 'ies'} this {kind.name} did not write "
             f"({listing([p.name for p in kept])}); only the {kind.name}'s own files are replaced")


def refuse_foreign_inside(out: Path, kind: FolderKind) -> None:
    """A folder the kind made (a sweep's grid point) is replaced whole: one that holds files
    clipfit did not write stops the replacement before anything moves."""
    for entry in own_entries(out, kind):
        found = [p.name for p in foreign_entries(entry, RUN)] if kind.made_folders(entry) else []
        if found:
            raise UsageError(f"{entry}: holds {listing(found)}, which clipfit did not write; move "
                             f"{'it' if len(found) == 1 else 'them'} out of the {kind.name} folder before --overwrite "
                             "replaces it")


def probe_writable(out: Path, kind: FolderKind = RUN) -> None:
    probe = out / WRITE_PROBE
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{out}: cannot write to the {kind.name} folder ({e.strerror or e})") from None


# --- run.json and the files written with it -----------------------------------------------------

def write_run_json(run_dir: Path, record: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """The one writer of run.json: the run's `record` so far, with `sections` merged into it (in
    place: the caller's record grows with it), written atomically. Returns the record."""
    record.update(sections)
    write_json(run_dir / RUN_JSON, record)
    return record


def write_skipped(run_dir: Path, check: CheckReport) -> None:
    """The bad items a run skipped. Written with run.json, not earlier: a run that fails while
    setting up leaves no run.json, so the corrected command may reuse the folder without --overwrite."""
    if check.skipped:
        write_text(run_dir / SKIPPED_TXT, "".join(f"{printable(p.path)}\t{printable(p.reason)}\n" for p in check.skipped))


def environment() -> dict[str, Any]:
    """What run.json records about the machine and the packages that made the run."""
    versions = {package: installed_version(package)
                for package in ("clipfit", "torch", "torchvision", "open_clip_torch", "peft", "faiss-cpu", "safetensors")}
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions}


# --- free space, resume ------------------------------------------------------------------------

def check_free_space(run_dir: Path, parameter_bytes: int, trainable_bytes: int, keep: int) -> None:
    """`keep` checkpoints and the next one, which is written before the oldest is deleted (each the
    trainable weights and their two AdamW moments; the frozen weights stay out,
    clipfit.train.changing_state), and the model written at the end, less what the folder holds
    towards it already: checkpoints that the run rotates out as it goes (a resumed run's) and a
    replaced run's staged files, deleted before training."""
    needed = parameter_bytes + (keep + 1) * 3 * trainable_bytes
    free = shutil.disk_usage(run_dir).free + folder_bytes(run_dir / STAGING) + folder_bytes(run_dir / CHECKPOINT_DIR)
    if free < needed:
        raise OutputError(f"{run_dir}: {free / 2**20:.0f} MiB free, the run needs about {needed / 2**20:.0f} MiB "
                          "(checkpoints and model); free space, use another --out or --keep-checkpoints 1")


def read_saved(run_dir: Path) -> dict[str, Any]:
    """run.json of the run to resume, or one line saying why it cannot be used."""
    path = run_dir / RUN_JSON
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: unreadable, cannot resume from it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); start again with --overwrite") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)
            and isinstance(saved.get("resolved"), dict)):
        raise UsageError(f"{path}: not a clipfit run.json (no config/resolved tables), cannot resume from it; "
                         "start again with --overwrite")
    return saved


def compare_with_saved(run_dir: Path, config: RefineConfig, pairs_path: str) -> dict[str, Any]:
    """The saved run, if this one's settings would give its result; the explicit default of a
    setting with a resolved default (--lr 1e-5 without --lora) counts as that default."""
    saved = read_saved(run_dir)
    old, new = saved_settings(saved["config"]), config.to_dict()
    old["lr"], new["lr"] = saved["resolved"].get("lr", old.get("lr")), config.resolved_lr()
    changed = [k for k in new if k not in RESULT_NEUTRAL and old.get(k) != new[k]]
    if saved.get("pairs") != recorded_pairs(pairs_path):
        changed.append("PAIRS")
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3] if k != "PAIRS")
        raise UsageError(f"--resume refused: settings that change the result differ from the saved run "
                         f"({', '.join(changed)}{'; ' + detail if detail else ''})")
    return saved


def recorded_pairs(pairs_path: str) -> str:
    """Where the pairs are, as run.json records it: an absolute path, or a hub address as given."""
    from clipfit.data.tables import HUB_DATASET_PREFIX

    return pairs_path if pairs_path.startswith(HUB_DATASET_PREFIX) else str(Path(pairs_path).resolve())


def check_schedule(saved: dict | None, config: RefineConfig, total_steps: int) -> None:
    """--max-steps decides where a cosine schedule ends, so it must match on resume; a constant
    schedule (warm-up included, which counts from step 0) does not depend on it."""
    if not saved or config.schedule != "cosine":
        return
    before = saved["resolved"].get("total_steps")
    if before != total_steps:
        raise UsageError(f"--resume refused: the cosine schedule was planned over {before} steps, this command "
                         f"gives {total_steps} (--max-steps {saved['config'].get('max_steps')!r} -> "
                         f"{config.max_steps!r}); the result would match no uninterrupted run")


def check_resumable(saved: dict | None, same_data: bool, world_size: int, pairs_path: str) -> None:
    if saved and not same_data:
        raise UsageError(f"--resume refused: the pairs in {pairs_path} changed since the run started")
    if saved and saved["resolved"].get("world_size", 1) != world_size:
        raise UsageError(f"--resume refused: the run started with {saved['resolved'].get('world_size', 1)} process(es), "
                         f"this is {world_size}; the global batch and data order depend on it")


def resume_command(argv: list[str]) -> str:
    args = [a for a in argv if a not in ("--resume", "--overwrite")]  # --overwrite would replace what we resume
    return shlex.join(["clipfit", *args, "--resume"])


log = logging.getLogger("clipfit")

HF_NAME_KEYS = ("hf_model_name", "hf_tokenizer_name")
# What a tokenizer or config records about how it was loaded here, not what it is.
LOAD_TIME_KEYS = ("is_local", "local_files_only", "name_or_path", "_name_or_path")


# --- what a run folder holds for loading: portable, self-contained ------------------------------

def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file()


def portable_name(name: str) -> str:
    """A hub id stays; a local path becomes the folder's name (clipfit cannot know its hub id)."""
    path = Path(name)
    if not (path.is_absolute() or path.exists()):
        return name
    log.warning("the text tower came from the local folder %s; the run folder names it %r, which plain "
                "open_clip resolves on the hub (clipfit loads it from the run folder)", name, path.name)
    return path.name


def portable_model_cfg(model_cfg: dict) -> dict:
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    for key in HF_NAME_KEYS:
        if text_cfg.get(key):
            text_cfg[key] = portable_name(str(text_cfg[key]))
    return {**model_cfg, "text_cfg": text_cfg}


def portable_weights_name(pretrained: str) -> str:
    """A tag as it is; a weights file by its name only."""
    return Path(pretrained).name if ("/" in pretrained or Path(pretrained).exists()) else pretrained


def write_text_tower(folder: Path, model, tokenizer) -> list[str]:
    """A Hugging Face tokenizer's files and text tower's config into `folder`; the names written."""
    written = []
    save_tokenizer = getattr(tokenizer, "save_pretrained", None)
    if callable(save_tokenizer):  # open_clip's HFTokenizer; its own CLIP tokenizer needs no files
        before = set(p.name for p in folder.iterdir())
        save_tokenizer(str(folder))
        written += sorted(set(p.name for p in folder.iterdir()) - before)
        drop_load_time_keys(folder / "tokenizer_config.json")
    text_config = getattr(getattr(model, "text", None), "config", None)
    if text_config is not None and hasattr(text_config, "to_dict"):
        # to_dict() is what transformers' save_pretrained writes, less where it was loaded from
        write_json(folder / HF_TEXT_CONFIG, {k: v for k, v in text_config.to_dict().items()
                                             if k not in LOAD_TIME_KEYS})
        written.append(HF_TEXT_CONFIG)
    return sorted(set(written))


def drop_load_time_keys(path: Path) -> None:
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    write_json(path, {k: v for k, v in config.items() if k not in LOAD_TIME_KEYS})


def write_config(folder: Path, model_cfg: dict, preprocess_cfg: dict, arch: str, pretrained: str) -> None:
    write_json(folder / OPEN_CLIP_CONFIG, {
        "model_cfg": portable_model_cfg(model_cfg),
        "preprocess_cfg": preprocess_cfg,
        "clipfit": {"arch": arch, "pretrained": portable_weights_name(pretrained)},
    })


def read_config(folder: Path) -> dict[str, Any]:
    """A run folder's open_clip_config.json; ModelError (exit 4) when it is not one clipfit wrote."""
    from clipfit.hub import first_line

    path = folder / OPEN_CLIP_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable model config ({first_line(e)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ModelError(f"{path}: not an open_clip model config (no model_cfg object)")
    if not isinstance(config.get("clipfit"), dict):
        config["clipfit"] = {}
    return config
