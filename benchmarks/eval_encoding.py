"""Encoding images for evaluation on CPU: the weights' layout and what the allocator does with freed memory.

    python benchmarks/eval_encoding.py PAIRS [--repeats 3] [--batch-size 64] [--model lite0-minilm]

Each variant is a fresh process (the allocator is set once, at start) that decodes and
preprocesses every image of PAIRS once, then times only the image tower's forward passes in
batches of --batch-size, one thread: user and kernel CPU seconds and minor page faults
(getrusage). Variants:

- usual layout, glibc's default (what clipfit did before; CLIP_benchmark's setting);
- channels-last weights (clipfit.models.use_channels_last), glibc's default;
- usual layout, freed memory kept (clipfit.runtime.keep_freed_memory);
- channels-last, freed memory kept (what `clipfit eval` does now).

Prints a markdown table (min and median over the repeats) and the largest difference of the
features from the first variant's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"usual layout, glibc default": (False, False), "channels-last, glibc default": (True, False),
            "usual layout, freed memory kept": (False, True), "channels-last, freed memory kept": (True, True)}


def child(pairs: str, model: str, batch_size: int, channels_last: bool, keep: bool, out: str) -> None:
    if keep:
        from clipfit.runtime import keep_freed_memory

        assert keep_freed_memory(), "glibc refused"
    import resource

    import torch

    from clipfit.data.images import open_rgb
    from clipfit.data.layouts import load_pairs
    from clipfit.models import load_model, use_channels_last

    torch.set_num_threads(1)
    loaded = load_model(model, "aligned")
    model_ = loaded.model.eval()
    if channels_last:
        use_channels_last(model_, torch.device("cpu"))
    pixels = torch.stack([loaded.preprocess_val(open_rgb(p.image)) for p in load_pairs(pairs).pairs])
    before = resource.getrusage(resource.RUSAGE_SELF)
    with torch.no_grad():
        features = torch.cat([model_.encode_image(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
    after = resource.getrusage(resource.RUSAGE_SELF)
    torch.save(features, out + ".pt")
    Path(out).write_text(json.dumps({"user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
                                     "faults": after.ru_minflt - before.ru_minflt, "images": len(pixels)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="lite0-minilm")
    parser.add_argument("--child", nargs=3, metavar=("CHANNELS_LAST", "KEEP", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.pairs, args.model, args.batch_size, args.child[0] == "1", args.child[1] == "1", args.child[2])
        return
    import torch

    work = Path(tempfile.mkdtemp(prefix="clipfit-eval-encoding-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out = work / f"{names.index(name)}-{r}.json"
            flags = ["1" if flag else "0" for flag in VARIANTS[name]]
            subprocess.run([sys.executable, __file__, args.pairs, "--batch-size", str(args.batch_size), "--model",
                            args.model, "--child", *flags, str(out)], check=True, env=env, cwd=work,
                           stderr=subprocess.DEVNULL)
            runs[name].append({**json.loads(out.read_text()), "features": torch.load(str(out) + ".pt")})
            print(f"  repeat {r + 1} {name}: user {runs[name][-1]['user']:.2f} s, kernel {runs[name][-1]['sys']:.2f} s",
                  file=sys.stderr, flush=True)
    reference = runs[names[0]][0]["features"]
    print(f"| {runs[names[0]][0]['images']} images, batches of {args.batch_size}, one thread | user CPU s, min / median "
          "| kernel CPU s, min / median | total CPU s, median | minor page faults, median | largest feature difference |")
    print("|---|---|---|---|---|---|")
    for name, results in runs.items():
        user, kernel = [r["user"] for r in results], [r["sys"] for r in results]
        total = statistics.median(u + k for u, k in zip(user, kernel))
        worst = max(float((r["features"] - reference).abs().max()) for r in results)
        print(f"| {name} | {min(user):.2f} / {statistics.median(user):.2f} | {min(kernel):.2f} / "
              f"{statistics.median(kernel):.2f} | {total:.2f} | {statistics.median(r['faults'] for r in results):.0f} "
              f"| {worst:.2g} |")
    print(f"\n{args.repeats} repeat(s), alternating; load average before the last: {os.getloadavg()[0]:.1f}.")


if __name__ == "__main__":
    main()
