"""`clipfit eval ...` and `clipfit compare`: parse, call, print. Heavy imports inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape as rich_escape

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate any model clipfit can load: zero-shot classification, "
                                                  "retrieval, embedding geometry, linear probe, suites of sets.")


def model_option() -> Any:
    return typer.Option("ViT-B-32", "--model", help="open_clip architecture, hf-hub:org/name, model-config JSON, "
                                                    "clipfit run folder, or lite0-minilm.")


def pretrained_option() -> Any:
    return typer.Option("openai", "--pretrained", help="open_clip tag, weights file, or 'none' (ignored for a run folder).")


def batch_size_option() -> Any:
    return typer.Option(64, "--batch-size", min=1, help="Images or texts per forward pass.")


def workers_option() -> Any:
    return typer.Option(2, "--workers", min=0, help="DataLoader worker processes.")


def precision_option() -> Any:
    return typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (autocast).")


def device_option() -> Any:
    return typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")


def json_option() -> Any:
    return typer.Option(False, "--json", help="Print CLIP_benchmark-shaped JSON instead of a table.")


def out_option() -> Any:
    return typer.Option(None, "--out", help="Also write the CLIP_benchmark-shaped JSON to this file.")


def quiet_option() -> Any:
    return typer.Option(False, "--quiet", help="No progress bar.")


def fixed_identity(model: str, pretrained: str) -> dict | None:
    """The model's identity for cache keys, when loading it twice gives the same weights: not for
    random weights (`--pretrained none`), which this command draws unseeded."""
    from clipfit.cache import encoder_identity
    from clipfit.hub import HUB_PREFIX
    from clipfit.rundir import is_run_dir

    fixed = pretrained not in ("", "none") or is_run_dir(Path(model)) or model.startswith(HUB_PREFIX)
    return encoder_identity(model, pretrained) if fixed else None


def cache_dir_option() -> Any:
    return typer.Option(None, "--cache-dir", help=rich_escape("Where zero-shot classifiers are kept between runs "
                                                              "[default: $XDG_CACHE_HOME/clipfit or ~/.cache/clipfit]."))


def warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def warn_trivial(where: str, candidates: int, what: str) -> None:
    """One line when the set cannot tell models apart (clipfit.eval.metrics.trivial_set)."""
    from clipfit.eval.metrics import trivial_set

    problem = trivial_set(candidates, what)
    if problem:
        warn(f"{where}: {problem}")


class Session:
    """One loaded model on one device, with the feature cache of one command."""

    def __init__(self, model: str, pretrained: str, batch_size: int, workers: int, precision: str, device: str,
                 quiet: bool, cache_dir: Optional[Path] = None):
        from clipfit.cache import FeatureCache, resolve_cache_dir
        from clipfit.errors import UsageError
        from clipfit.eval.encode import encoder_for
        from clipfit.models import load_model, resolve_device
        from clipfit.precision import AUTOCAST

        if precision not in AUTOCAST:
            raise UsageError(f"--precision {precision!r}: choose one of {', '.join(AUTOCAST)}")
        torch_device = resolve_device(device)
        if precision == "fp16" and torch_device.type == "cpu":
            raise UsageError("--precision fp16 is not supported on CPU; use bf16")
        self.loaded = load_model(model, pretrained)
        self.model_name, self.pretrained = self.names(model, pretrained)
        network = self.loaded.model.to(torch_device).eval()
        self.encoder = encoder_for(self.loaded, network, torch_device, batch_size, workers, precision, quiet,
                                   identity=fixed_identity(model, pretrained),
                                   feature_cache=FeatureCache(resolve_cache_dir(cache_dir), warn=warn))

    def names(self, model: str, pretrained: str) -> tuple[str, str]:
        """What CLIP_benchmark's `model` and `pretrained` fields should say: the weights that were
        evaluated, not the --pretrained default a starter, hub model or run folder ignores."""
        if self.loaded.source.get("kind") == "run":
            return self.loaded.arch, self.loaded.source["path"]
        return self.loaded.arch, self.loaded.pretrained

    def record(self, dataset: str, task: str, metrics: dict[str, float], extra: dict | None = None,
               templates: list[str] | None = None) -> dict:
        from clipfit.eval.results import benchmark_json

        return benchmark_json(dataset, self.model_name, self.pretrained, task, metrics, extra, templates)

    def report(self, dataset: str, task: str, metrics: dict[str, float], as_json: bool, out: Optional[Path],
               extra: dict | None = None) -> None:
        show(self, self.record(dataset, task, metrics, extra), as_json, out)


def data_option() -> Any:
    return typer.Option(None, "--data", help=rich_escape("The set's folder (see docs/evaluation.md for layouts), or "
                                                         "for wds/NAME hf-hub:ORG/NAME [default for wds/NAME: "
                                                         "hf-hub:clip-benchmark/wds_NAME]."))


def set_spec(dataset: str, data: Optional[str], classnames: Optional[Path] = None, templates: Optional[Path] = None,
             task: str = "zeroshot"):
    """The one set a command names (DATASET with --data) for `task`, checked before any model is loaded."""
    from clipfit.errors import UsageError
    from clipfit.eval.catalog import dataset_names, is_wds, known
    from clipfit.eval.suites import SetSpec

    if not known(dataset):
        raise UsageError(f"unknown dataset {dataset!r}: choose one of {dataset_names()}")
    if data is None and not is_wds(dataset):
        raise UsageError(f"{dataset} needs --data, the folder that holds it")
    spec = SetSpec(dataset, data, None, str(classnames) if classnames else None, str(templates) if templates else None)
    if spec.task != task:
        kind = "retrieval" if spec.task == "retrieval" else "classification"
        raise UsageError(f"{dataset} is a {kind} set: evaluate it with `clipfit eval {spec.task}`")
    return spec


def evaluate_set(session: Session, spec, data) -> dict:
    """One loaded set through the session's model: its CLIP_benchmark record."""
    from clipfit.eval.retrieval import geometry_metrics, retrieval_features, retrieval_metrics
    from clipfit.eval.zeroshot import zeroshot

    if spec.task == "retrieval":
        features = retrieval_features(session.encoder, data, str(spec.location))
        metrics = {**retrieval_metrics(features), **geometry_metrics(features)}
        return session.record(spec.benchmark_name(), "zeroshot_retrieval", metrics,
                              {"images": len(features.image), "captions": len(features.text)})
    metrics = zeroshot(session.encoder, data)
    extra = {"images": len(data.features(session.encoder)[1]), "classes": data.class_count,
             "templates": len(data.templates), "classnames_source": data.sources.get("classnames"),
             "templates_source": data.sources.get("templates")}
    return session.record(spec.benchmark_name(), "zeroshot_classification", metrics, extra, data.templates)


@eval_app.command("zeroshot")
def zeroshot_command(
    dataset: str = typer.Argument(..., help="imagenet, cifar10, cifar100, folder, imagenet-v2, imagenet-sketch, "
                                            "imagenet-r, imagenet-a, objectnet, or wds/NAME (CLIP_benchmark's layout)."),
    data: Optional[str] = data_option(),
    classnames: Optional[Path] = typer.Option(None, "--classnames", help="Class names, JSON list or one per line, in folder order."),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Prompt templates with {c} for the class name, JSON list or one per line."),
    model: str = model_option(), pretrained: str = pretrained_option(), batch_size: int = batch_size_option(),
    workers: int = workers_option(), precision: str = precision_option(), device: str = device_option(),
    as_json: bool = json_option(), out: Optional[Path] = out_option(), quiet: bool = quiet_option(),
    cache_dir: Optional[Path] = cache_dir_option(),
) -> None:
    """Zero-shot classification: top-1 with its calibration error (ECE), top-5 (more than 5 classes),
    mean per-class recall; mean average precision for a multi-label set."""
    from clipfit.eval.suites import load_set

    spec = set_spec(dataset, data, classnames, templates, "zeroshot")
    labelled = load_set(spec)
    warn_trivial(spec.location or spec.dataset, labelled.class_count, "class")
    session = Session(model, pretrained, batch_size, workers, precision, device, quiet or as_json, cache_dir)
    record = evaluate_set(session, spec, labelled)
    show(session, record, as_json, out)


def show(session: Session, record: dict, as_json: bool, out: Optional[Path]) -> None:
    """A CLIP_benchmark record: written to --out, printed as JSON or as a table (rates in percent)."""
    from clipfit.eval.metrics import is_number
    from clipfit.eval.results import is_rate, print_table
    from clipfit.io import dumps_json, write_json

    if out is not None:
        write_json(out, record)
    if as_json:
        typer.echo(dumps_json(record))
        return
    metrics = {k: 100 * v if is_rate(k) and is_number(v) else v for k, v in record["metrics"].items()}
    source = (record.get("clipfit") or {}).get("templates_source")
    print_table(f"{record['task']} · {record['dataset']} · {session.model_name} ({session.pretrained})", metrics,
                f"templates: {source}" if source else None)


def pairs_command(pairs: str, task: str, model: str, pretrained: str, batch_size: int, workers: int, precision: str,
                  device: str, as_json: bool, out: Optional[Path], quiet: bool) -> None:
    from clipfit.eval.retrieval import encode_pairs_all_captions, geometry_metrics, load_eval_pairs, retrieval_metrics

    items = load_eval_pairs(pairs, workers, warn=warn)
    warn_trivial(pairs, len(items), "pair")
    session = Session(model, pretrained, batch_size, workers, precision, device, quiet or as_json)
    features = encode_pairs_all_captions(session.encoder, items, str(Path(pairs).resolve()))
    metrics = geometry_metrics(features) if task == "geometry" else {**retrieval_metrics(features), **geometry_metrics(features)}
    session.report(Path(pairs).resolve().name, task, metrics, as_json, out,
                   {"images": len(features.image), "captions": len(features.text)})


@eval_app.command("retrieval")
def retrieval_command(
    pairs: str = typer.Argument(..., help="Folder (or CSV) of image-caption pairs, any clipfit layout; or wds/NAME, "
                                          "a retrieval set in CLIP_benchmark's layout (--data)."),
    data: Optional[str] = data_option(),
    model: str = model_option(), pretrained: str = pretrained_option(), batch_size: int = batch_size_option(),
    workers: int = workers_option(), precision: str = precision_option(), device: str = device_option(),
    as_json: bool = json_option(), out: Optional[Path] = out_option(), quiet: bool = quiet_option(),
    cache_dir: Optional[Path] = cache_dir_option(),
) -> None:
    """Image↔text Recall@1/5/10 and MRR (every caption counts), plus embedding geometry."""
    from clipfit.eval.catalog import is_wds

    if not is_wds(pairs):
        pairs_command(pairs, "zeroshot_retrieval", model, pretrained, batch_size, workers, precision, device, as_json,
                      out, quiet)
        return
    from clipfit.eval.suites import load_set

    spec = set_spec(pairs, data, task="retrieval")
    stream = load_set(spec)
    session = Session(model, pretrained, batch_size, workers, precision, device, quiet or as_json, cache_dir)
    show(session, evaluate_set(session, spec, stream), as_json, out)


@eval_app.command("geometry")
def geometry_command(
    pairs: str = typer.Argument(..., help="Folder (or CSV) of image-caption pairs, any clipfit layout."),
    model: str = model_option(), pretrained: str = pretrained_option(), batch_size: int = batch_size_option(),
    workers: int = workers_option(), precision: str = precision_option(), device: str = device_option(),
    as_json: bool = json_option(), out: Optional[Path] = out_option(), quiet: bool = quiet_option(),
) -> None:
    """Modality gap (L2 and CLIP-Refine's MSE), alignment and uniformity of the embeddings."""
    pairs_command(pairs, "geometry", model, pretrained, batch_size, workers, precision, device, as_json, out, quiet)


@eval_app.command("linear-probe")
def linear_probe_command(
    data: Path = typer.Option(..., "--data", help="ImageFolder with train/ and test/, or one ImageFolder split by --seed."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/validation/test split."),
    optimizer: str = typer.Option("lbfgs", "--optimizer", help="lbfgs (full batch) or adam."),
    model: str = model_option(), pretrained: str = pretrained_option(), batch_size: int = batch_size_option(),
    workers: int = workers_option(), precision: str = precision_option(), device: str = device_option(),
    as_json: bool = json_option(), out: Optional[Path] = out_option(), quiet: bool = quiet_option(),
) -> None:
    """Logistic regression on frozen image features; L2 strength chosen on a validation split."""
    from clipfit.errors import UsageError
    from clipfit.eval.linear_probe import linear_probe, probe_splits

    if optimizer not in ("lbfgs", "adam"):
        raise UsageError(f"--optimizer {optimizer!r}: choose lbfgs or adam")
    splits = probe_splits(data, seed)
    warn_trivial(str(data), len(splits.train.classes), "class")
    session = Session(model, pretrained, batch_size, workers, precision, device, quiet or as_json)
    metrics = linear_probe(session.encoder, splits, optimizer)
    session.report(splits.test.name, "linear_probe", metrics, as_json, out,
                   {"train": len(splits.train.images), "val": len(splits.val.images), "test": len(splits.test.images)})


@eval_app.command("suite")
def suite_command(
    suites: list[str] = typer.Argument(..., help="robustness, vtab, a suite .toml file, DATASET=PATH or wds/NAME "
                                                 "(several: one table)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Read the built-in suites' sets under this folder, not "
                                                             "from the hub (docs/evaluation.md names the folders)."),
    model: str = model_option(), pretrained: str = pretrained_option(), batch_size: int = batch_size_option(),
    workers: int = workers_option(), precision: str = precision_option(), device: str = device_option(),
    as_json: bool = json_option(),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write suite.md, suite.json (CLIP_benchmark's "
                                                           "record of every set) and suite.csv into."),
    quiet: bool = quiet_option(), cache_dir: Optional[Path] = cache_dir_option(),
) -> None:
    """Several sets, one table: each set's top-1 and ECE (or mAP, or Recall@5), and the mean."""
    from clipfit.errors import UsageError
    from clipfit.eval.catalog import BUILTIN_SUITES
    from clipfit.eval.compare import SUITE_JSON
    from clipfit.eval.suites import load_set, named, parse_specs, suite_csv, suite_markdown, suite_result
    from clipfit.io import dumps_json, write_json, write_text

    if root is not None and not any(item in BUILTIN_SUITES for item in suites):
        raise UsageError(f"--root reads the built-in suites ({', '.join(BUILTIN_SUITES)}) from a folder; "
                         "the other sets name their own paths")
    items = [f"{item}={root}" if root is not None and item in BUILTIN_SUITES else item for item in suites]
    specs = named(parse_specs(items, "clipfit eval suite"))
    if out is not None:
        claim_suite_folder(out)
    loaded = {name: load_set(spec) for name, spec in specs.items()}  # every set found before the model loads
    for name, data in loaded.items():
        if specs[name].task == "zeroshot":
            warn_trivial(name, data.class_count, "class")
    session = Session(model, pretrained, batch_size, workers, precision, device, quiet or as_json, cache_dir)
    records = {name: evaluate_set(session, specs[name], data) for name, data in loaded.items()}
    result = suite_result(suites, session.model_name, session.pretrained, records)
    if out is not None:
        write_text(out / "suite.md", suite_markdown(result))
        write_json(out / SUITE_JSON, result)
        write_text(out / "suite.csv", suite_csv(result))
    typer.echo(dumps_json(result) if as_json else suite_markdown(result), nl=as_json)


def claim_suite_folder(out: Path) -> None:
    """OutputError (exit 7) when `out` holds suite files clipfit did not write: never overwrite them;
    UsageError (exit 2) when `out` is a file."""
    import json

    from clipfit.errors import OutputError, UsageError
    from clipfit.eval.compare import SUITE_JSON

    if out.exists() and not out.is_dir():  # found now, not after every set was evaluated
        raise UsageError(f"{out}: --out is a file, not a folder; choose a folder for the suite's tables")
    present = [out / name for name in ("suite.md", SUITE_JSON, "suite.csv") if (out / name).exists()]
    if not present:
        return
    try:
        ours = {"suite", "sets", "mean"} <= set(json.loads((out / SUITE_JSON).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise OutputError(f"{present[0]}: exists and is not a suite clipfit wrote; choose another --out folder")


def compare_command(
    runs: list[Path] = typer.Argument(..., help="Run folders (each with a run.json), or suites written by "
                                                "`clipfit eval suite --out` (the folder or its suite.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show the before/after metrics of several runs side by side, and their evaluation sets'
    top-1 and ECE (with two, the change per set and in the mean)."""
    from clipfit.eval.compare import compare_runs, print_comparison
    from clipfit.io import dumps_json

    table = compare_runs(runs)
    if as_json:
        typer.echo(dumps_json(table))
    else:
        print_comparison(table)
