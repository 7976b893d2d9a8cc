"""Reproduce the paper's table: each model trained with AdamW and with SEvo-AdamW over seeds.

The grid's models are the reference implementation's backbones: ``sasrec``, ``gru4rec``,
``bert4rec``, ``stosa``, ``mfbpr`` (user and item tables smoothed on the user-item graph,
``MF-BPR/main.py``) and ``mfbpr-item`` (the item table alone on the item-item graph,
``MF-BPR/main2.py``: ``--model mfbpr --graph cooccurrence``). Every run is exactly
``sevo-train --model M [--graph G] --data D --optimizer O --seed S --out OUT/V-O-sS`` (printed
beside its row; ``V`` the grid's model name), with the reference's per-model defaults.
Finished runs are skipped and unfinished ones resumed, so the grid can be stopped and
restarted; a finished record trained with other ``--data``, ``--format``, ``--epochs`` or
``--patience`` than the grid's is an error naming it, never a reused result (any other field
that differs, e.g. a default changed since, is printed as a note); a run that another grid
name has trained already (MF-BPR's AdamW baseline is the same run on both graphs: AdamW reads
no graph) is not trained again, its record says ``same_run_as``. The summary (mean and std over
seeds of the test metrics at the best validation epoch, the published numbers beside them) is
printed and written to ``OUT/summary.md``.

    python examples/reproduce_paper.py \\
        --data ../shared/data/amazon-beauty/Beauty.txt --out runs/beauty
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import time
from pathlib import Path

import jax
import numpy as np

from sevo_jax import data, host_memory, training

# SEVO_SPEC.md §5: SEvo-AdamW, mean of 5 seeds, full ranking, test split. STOSA and the two
# MF-BPR forms: the means of the reference's logged Beauty runs as quoted in issue #15 (the
# paper's single MF-BPR row, spec §5, is HR@1 0.0074, HR@10 0.0470, NDCG@10 0.0238).
PUBLISHED = {
    ("sasrec", "beauty"): {"HR@1": 0.0154, "HR@10": 0.0758, "NDCG@10": 0.0411},
    ("gru4rec", "beauty"): {"HR@1": 0.0094, "HR@10": 0.0524, "NDCG@10": 0.0273},
    ("bert4rec", "beauty"): {"HR@1": 0.0172, "HR@10": 0.0772, "NDCG@10": 0.0430},
    ("stosa", "beauty"): {"HR@10": 0.0775, "NDCG@10": 0.0457},
    ("mfbpr", "beauty"): {"HR@10": 0.0461, "NDCG@10": 0.0233},
    ("mfbpr-item", "beauty"): {"HR@10": 0.0480, "NDCG@10": 0.0244},
    ("sasrec", "movielens-1m"): {"HR@1": 0.0517, "HR@10": 0.2567, "NDCG@10": 0.1384},
    ("gru4rec", "movielens-1m"): {"HR@1": 0.0487, "HR@10": 0.2568, "NDCG@10": 0.1366},
}
COLUMNS = ("HR@1", "HR@10", "NDCG@10")

# The grid's model names: (sevo-train --model, TrainConfig fields beyond the defaults).
VARIANTS: dict[str, tuple[str, dict]] = {
    "sasrec": ("sasrec", {}),
    "gru4rec": ("gru4rec", {}),
    "bert4rec": ("bert4rec", {}),
    "stosa": ("stosa", {}),
    "mfbpr": ("mfbpr", {}),
    "mfbpr-item": ("mfbpr", {"graph": "cooccurrence"}),
}


def variant_fields(variant: str, optimizer: str) -> tuple[str, dict]:
    """``(model, extra fields)`` of a grid variant for ``optimizer``: without SEvo's fields
    when it has no SEvo (MF-BPR's AdamW baseline reads no graph: one run for both forms)."""
    model, extra = VARIANTS[variant]
    unread = training.unread_optimizer_fields(optimizer)
    return model, {k: v for k, v in extra.items() if k not in unread}


def command(args: argparse.Namespace, variant: str, optimizer: str, seed: int, out: Path) -> str:
    model, extra = variant_fields(variant, optimizer)
    parts = ["sevo-train", "--model", model]
    for key, value in extra.items():
        parts += [f"--{key.replace('_', '-')}", str(value)]
    parts += ["--optimizer", optimizer, "--seed", str(seed), "--out", str(out)]
    if args.data:
        parts += ["--data", args.data]
    if args.format:
        parts += ["--format", args.format]
    if args.epochs:
        parts += ["--epochs", str(args.epochs)]
    if args.patience is not None:
        parts += ["--patience", str(args.patience)]
    return shlex.join(parts)


def _format(args: argparse.Namespace) -> str:
    return args.format or ("synthetic" if args.data is None else data.detect_format(args.data))


# Config fields that leave a run's results unchanged (``graph`` and ``beta`` are read by
# SEvo's smoothing only: an optimizer without it trains the same run on any graph).
NO_EFFECT_FIELDS = frozenset({"out", "progress", "cache_dir", "compile_cache"})
SEVO_ONLY_FIELDS = frozenset({"graph", "beta"})


# Fields that this script's own flags set: a finished record that differs in one of them is
# not a run of this grid (an error, never a silently reused result).
GRID_FIELDS = {"data": "--data", "format": "--format", "epochs": "--epochs",
               "patience": "--patience"}


def grid_config(args: argparse.Namespace, variant: str, optimizer: str, seed: int, out: Path,
                fmt: str) -> training.TrainConfig:
    """The ``TrainConfig`` of one run of the grid (``command`` prints the same run)."""
    model, extra = variant_fields(variant, optimizer)
    return training.TrainConfig(model=model, optimizer=optimizer, seed=seed, data=args.data,
                                **extra, format=fmt, epochs=args.epochs, out=str(out),
                                progress=args.progress,
                                **({} if args.patience is None else {"patience": args.patience}))


def ignored_fields(resolved: dict) -> frozenset:
    """Config fields without effect on this run's results (see ``same_run``)."""
    return (NO_EFFECT_FIELDS | training.unread_fields(resolved["model"])
            | (SEVO_ONLY_FIELDS if not resolved["optimizer"].startswith("sevo")
               else frozenset()))


def same_data_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    return Path(a).resolve() == Path(b).resolve()


def read_record(path: Path) -> dict:
    """A run's ``results.json``, or a one-line ValueError naming the file if it is damaged."""
    try:
        record = json.loads(path.read_text())
        if not all(isinstance(record.get(k), dict) for k in ("config", "test", "valid")):
            raise ValueError("no config, test or valid section")
        return record
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}); delete it and run the grid again to "
                         "rewrite it from the run's checkpoints") from None


def write_record(path: Path, record: dict) -> None:
    """Write ``results.json`` atomically (a kill mid-write leaves the old file or none)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def check_record(path: Path, record: dict, resolved: dict,
                 fingerprint: str | None = None) -> list[str]:
    """Raise ValueError when the finished ``record`` at ``path`` was trained with other grid
    flags (``GRID_FIELDS``) or other data (by content ``fingerprint`` when given, else by
    path) than this grid's ``resolved`` config; return notes naming any other field it was
    trained with differently (a default changed since, e.g.), so the summary says so."""
    have, ignored = record["config"], ignored_fields(resolved)
    differ = {}
    if fingerprint is not None:
        if record.get("data", {}).get("fingerprint") != fingerprint:
            differ["data"] = (f"other data (fingerprint {record.get('data', {}).get('fingerprint')}"
                              f", this grid's {fingerprint})")
    elif not same_data_path(have.get("data"), resolved["data"]):
        differ["data"] = f"--data {have.get('data')} (this grid: {resolved['data']})"
    for field in GRID_FIELDS.keys() - {"data"}:
        if field in have and have[field] != resolved[field]:
            differ[field] = f"{GRID_FIELDS[field]} {have[field]} (this grid: {resolved[field]})"
    if differ:
        raise ValueError(f"{path} was trained with {'; '.join(differ.values())}: use another "
                         "--out for this grid, or delete that run folder to train it again")
    want = json.loads(json.dumps(resolved))
    # a field that the record lacks is newer than the run: nothing to say about it
    fields = sorted((have.keys() & want.keys()) - ignored - GRID_FIELDS.keys())
    return [f"note: {path.parent.name} was trained with {k}={have[k]!r} (now {want[k]!r})"
            for k in fields if have[k] != want[k]]


def same_run(resolved: dict, fingerprint: str, out: Path) -> Path | None:
    """A finished run beside ``out`` that IS this run: the same resolved config (``resolved``,
    a ``TrainConfig`` as a dict) but for fields without effect (``NO_EFFECT_FIELDS``, and
    ``SEVO_ONLY_FIELDS`` when the optimizer has no SEvo, and the fields the model does not
    read), on the same data. E.g. MF-BPR's AdamW baseline of both graph forms."""
    ignored = ignored_fields(resolved)
    want = {k: v for k, v in json.loads(json.dumps(resolved)).items() if k not in ignored}
    for record in sorted(out.parent.glob("*/results.json")):
        if record.parent == out:
            continue
        done = read_record(record)
        have = {k: v for k, v in done.get("config", {}).items() if k not in ignored}
        # a field that an older record lacks counts as None (its default when it was added)
        same = all(have.get(k) == want.get(k) for k in have.keys() | want.keys())
        if same and done.get("data", {}).get("fingerprint") == fingerprint:
            return record.parent
    return None


def run_one(args, ds, variant: str, optimizer: str, seed: int, out: Path) -> dict:
    done = out / "results.json"
    config = grid_config(args, variant, optimizer, seed, out, _format(args))
    resolved = dataclasses.asdict(config.resolved())
    if done.exists():
        record = read_record(done)
        for note in check_record(done, record, resolved, ds.fingerprint()):
            print(note)
        return record
    resume = training.has_checkpoint(out)  # else start again, over any partial log
    twin = None if resume else same_run(resolved, ds.fingerprint(), out)
    if twin is not None:  # this run has been trained already, under another grid name
        results = read_record(twin / "results.json")
        results = results | {"config": resolved, "same_run_as": str(twin)}
        out.mkdir(parents=True, exist_ok=True)
        write_record(done, results)
        print(f"{out}: the same run as {twin} (not trained again)")
        return results
    start = time.perf_counter()
    results = training.fit(config, dataset=ds, resume=resume, overwrite=not resume)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)  # this process only
    results["train_seconds"] = train_seconds(out)
    write_record(done, results)
    return results


def train_seconds(out: Path) -> float:
    """Training time of a run summed over its logged epochs, so it survives resumes."""
    log = out / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return round(sum(json.loads(line)["train_seconds"] for line in lines if line.strip()), 1)


def summarise(args, grid: dict, dataset_key: str) -> str:
    lines = [
        f"Data: `{args.data or 'synthetic'}`; machine: {platform.node()} ({jax.default_backend()}, "
        f"{jax.device_count()} device(s)); date: {time.strftime('%Y-%m-%d')}.",
        "",
        "| model | optimizer | finished seeds | " + " | ".join(COLUMNS)
        + " | best epoch | train min/run | published (SEvo) NDCG@10 |",
        "|---" * (len(COLUMNS) + 6) + "|",
    ]
    for (model, optimizer), runs in grid.items():
        tests = {k: np.array([r["test"][k] for r in runs]) for k in COLUMNS}
        cells = [f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"
                 for v in tests.values()]
        pub = PUBLISHED.get((model, dataset_key), {}).get("NDCG@10")
        best = ", ".join(f"{r['best_epoch']} (s{r['config']['seed']})" for r in runs)
        minutes = np.mean([r.get("train_seconds") or train_seconds(Path(r["config"]["out"]))
                           for r in runs]) / 60
        published = pub if optimizer == "sevo-adamw" and pub else "-"
        lines.append(f"| {model} | {optimizer} | {len(runs)} | " + " | ".join(cells)
                     + f" | {best} | {minutes:.1f} | {published} |")
    lines += ["", "Commands:", ""]
    for model, optimizer in grid:
        for seed in args.seeds:
            out = Path(args.out) / f"{model}-{optimizer}-s{seed}"
            lines.append(f"    {command(args, model, optimizer, seed, out)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    host_memory.keep_freed_memory()  # as sevo-train (sevo_jax/host_memory.py)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None)
    p.add_argument("--format", default=None)
    p.add_argument("--dataset-key", default="beauty",
                   help="row of the published table to compare with")
    p.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="default: the whole grid (mfbpr-item: MF-BPR on the item-item graph)")
    p.add_argument("--optimizers", nargs="+", default=["adamw", "sevo-adamw"],
                   choices=training.OPTIMIZERS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="default: the paper's per model")
    p.add_argument("--patience", type=int, default=None, help="default: the trainer's")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--summary-only", action="store_true",
                   help="train nothing: summarise the runs of the grid that have finished")
    args = p.parse_args(argv)
    known = sorted({key for _, key in PUBLISHED})
    if args.dataset_key not in known:
        print(f"note: no published numbers for --dataset-key {args.dataset_key} (known: "
              f"{', '.join(known)}); the published column shows -")
    try:
        summary = run_grid(p, args)
    except (ValueError, TypeError, OSError) as e:  # a bad file, flag value or folder: one line
        p.exit(2, f"{p.prog}: error: {' '.join(str(e).split())}\n")
    except KeyboardInterrupt:
        p.exit(130, f"{p.prog}: interrupted; the same command resumes the grid\n")
    Path(args.out, "summary.md").write_text(summary + "\n")
    print(summary)


def run_grid(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Train (or, with ``--summary-only``, read) every run of the grid; the summary's text."""
    ds = None if args.summary_only else data.load_dataset(_format(args), args.data)
    grid = {}
    for model in args.models:
        for optimizer in args.optimizers:
            outs = [Path(args.out) / f"{model}-{optimizer}-s{seed}" for seed in args.seeds]
            if args.summary_only:
                runs = []
                for seed, o in zip(args.seeds, outs, strict=True):
                    if not (o / "results.json").exists():
                        continue
                    record = read_record(o / "results.json")
                    fmt = args.format or record["config"].get("format")
                    resolved = dataclasses.asdict(
                        grid_config(args, model, optimizer, seed, o, fmt).resolved())
                    for note in check_record(o / "results.json", record, resolved):
                        print(note)
                    runs.append(record)
            else:
                runs = [run_one(args, ds, model, optimizer, seed, o)
                        for seed, o in zip(args.seeds, outs, strict=True)]
            if runs:
                grid[(model, optimizer)] = runs
    if not grid:
        p.error(f"no finished runs (results.json) under {args.out} for this grid")
    return summarise(args, grid, args.dataset_key)


if __name__ == "__main__":
    main()
