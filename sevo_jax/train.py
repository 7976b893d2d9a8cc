"""Command line: ``sevo-train`` / ``python -m sevo_jax.train``.

With no arguments it trains SASRec with SEvo-AdamW on the built-in synthetic data set.
Every flag maps onto one field of :class:`sevo_jax.training.TrainConfig`, except ``--resume``,
``--overwrite`` and ``--data-stats`` (load the data, print its statistics, train nothing).
Every flag is checked before any data is read; the data format is detected from the content.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from sevo_jax import data as data_lib
from sevo_jax import host_memory, training

PROG = "sevo-train"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of the whole usage block, and
    knows the flag of each config field (``flags``)."""

    def __init__(self, **kwargs):
        self.flags: dict[str, str] = {}  # before argparse adds --help
        super().__init__(**kwargs)

    def add_argument(self, *names, **kwargs):
        action = super().add_argument(*names, **kwargs)
        self.flags.setdefault(action.dest, names[0])
        return action

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{PROG}: error: {message} (see {PROG} --help)\n")
        raise SystemExit(2)


def model_default(field: str) -> str:
    """``default: sasrec 200, gru4rec 300, ...`` of a per-model field (``MODEL_DEFAULTS``)."""
    def cell(pair):
        return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]} ({pair[1]} on MovieLens)"

    values = [f"{m} {cell(d[field])}" for m, d in training.MODEL_DEFAULTS.items() if field in d]
    return "default per model (reference config): " + ", ".join(values)


def build_parser() -> _Parser:
    d = training.TrainConfig()
    p = _Parser(
        prog=PROG,
        description="Train SASRec / GRU4Rec / BERT4Rec / STOSA / MF-BPR with or without SEvo.",
        epilog="Per-model defaults are the SEvo reference implementation's configs "
               "(github.com/MTandHJ/SEvo, <model>/configs/AmazonBeauty_550_Chron.yaml, and "
               "MovieLens1M_550_Chron.yaml with --format movielens; MF-BPR with an item graph: "
               "MF-BPR/item-item/AmazonBeauty_550_Chron.yaml); SASRec and GRU4Rec on MovieLens "
               "follow the paper's spec §4, and so does --b2 0.98 of GRU4Rec and MF-BPR (their "
               "configs set no beta2). On the synthetic set every model trains 40 epochs.")
    a = p.add_argument
    a("--model", choices=training.MODELS, default=d.model)
    a("--data", default=None, help="data file or directory (omit for the synthetic set)")
    a("--format", choices=data_lib.FORMATS, default=None,
      help="data format (default: detected from the content of --data; synthetic without "
           "--data)")
    a("--optimizer", choices=training.OPTIMIZERS, default=d.optimizer)
    a("--graph", choices=training.GRAPHS, default=d.graph,
      help="prior graph for SEvo (auto: co-occurrence; user-item for mfbpr, which smooths its "
           "user and item tables; mfbpr with cooccurrence or category smooths its item table "
           "only, as the reference's MF-BPR/main2.py)")
    a("--epochs", type=int, default=None, help=model_default("epochs") + "; 40 synthetic")
    a("--batch-size", type=int, default=None, help=model_default("batch_size"))
    a("--lr", type=float, default=None, help=model_default("lr") + "; 0.1 for sgd")
    a("--weight-decay", type=float, default=None,
      help=model_default("weight_decay") + " for adamw; 0 for the others")
    a("--lr-decay-factor", type=float, default=d.lr_decay_factor,
      help="multiply the lr by this every --lr-decay-every epochs (the reference BERT4Rec's "
           "StepLR; its Beauty config leaves it at 1: no decay)")
    a("--lr-decay-every", type=int, default=d.lr_decay_every,
      help="epochs between lr decays (reference BERT4Rec: 25)")
    a("--b1", type=float, default=d.b1)
    a("--b2", type=float, default=None, help=model_default("b2"))
    a("--eps", type=float, default=d.eps, help="Adam's epsilon")
    a("--momentum", type=float, default=None, help="sgd momentum (default: none)")
    a("--beta", type=float, default=None,
      help="SEvo smoothing strength in [0, 1); " + model_default("beta")
           + f"; mfbpr with an item graph {training.MFBPR_ITEM_GRAPH_BETA}")
    a("--num-layers", type=int, default=d.num_layers, help="SEvo layers L")
    a("--approx", choices=training.APPROXIMATIONS, default=d.approx)
    a("--H", type=int, default=d.H, help="co-occurrence walk length")
    a("--maxlen", type=int, default=None,
      help=model_default("maxlen") + " (also the co-occurrence graph's window)")
    a("--dropout", type=float, default=None, help=model_default("dropout"))
    a("--attention-dropout", type=float, default=None,
      help="dropout on attention weights of bert4rec and stosa; "
           + model_default("attention_dropout"))
    a("--dropout-bits", type=int, choices=(16, 32), default=None,
      help="random bits per dropout decision of sasrec, bert4rec and stosa: 16 (default: "
           "masks drawn 4x faster) or 32 (flax nn.Dropout's masks; RESULTS.md's SASRec runs "
           "before 2026-12-05)")
    a("--mask-prob", type=float, default=None,
      help="bert4rec's cloze masking probability; " + model_default("mask_prob"))
    a("--pvn-weight", type=float, default=None,
      help="weight of stosa's positive-vs-negative term; " + model_default("pvn_weight"))
    a("--length-bucket", type=int, default=None,
      help="drop each batch's leading all-padding columns, keeping a multiple of this many "
           "(the same model, other dropout draws; default off: with --pack-rows it saves "
           "nothing, and without it SASRec's, GRU4Rec's and BERT4Rec's Beauty batches fill "
           "their maxlen; STOSA's use 71 of 100 columns)")
    a("--pack-rows", action=argparse.BooleanOptionalAction, default=None,
      help="sasrec, bert4rec and stosa: pack each batch's sequences into fewer rows, each item "
           "attending only within its own sequence (the same loss and gradient, other dropout "
           "draws; not the reference's: on Beauty 256 sequences of ~7 items fill ~40 rows of "
           "50, and loss + gradient take 0.1-0.4x the time, BENCHMARKS.md); default: on")
    a("--features", type=int, default=d.features, help="embedding width (every reference: 64)")
    a("--num-blocks", type=int, default=None,
      help="transformer blocks; " + model_default("num_blocks"))
    a("--num-heads", type=int, default=None,
      help="attention heads; " + model_default("num_heads"))
    a("--seed", type=int, default=d.seed)
    a("--eval-every", type=int, default=d.eval_every)
    a("--patience", type=int, default=d.patience,
      help="stop after this many evaluations without a better validation NDCG@10 "
           "(default: off, train all epochs as the paper does)")
    a("--eval-batch-size", type=int, default=d.eval_batch_size)
    a("--kcore", type=int, default=d.kcore)
    a("--keep-duplicates", action="store_true",
      help="keep exact duplicate (user, item, timestamp) rows (default: drop them and report "
           "how many; duplicates make a validation/test target the item just seen)")
    a("--cache-dir", default=None, help="cache preprocessed splits here (.npz)")
    a("--out", default=d.out, help="output directory")
    a("--mesh", default=None, metavar="NAME=SIZE",
      help="shard the item table(s), their optimizer state and the batch over SIZE devices "
           "(one mesh axis, e.g. data=8; SIZE must divide the device count)")
    a("--distributed", action="store_true",
      help="several hosts: call jax.distributed.initialize() first (one process per host, all "
           "running the same command; Slurm/Open MPI/TPU/Kubernetes are auto-detected)")
    a("--coordinator", default=None, metavar="HOST:PORT",
      help="with --distributed: process 0's address (default: auto-detected or "
           "$JAX_COORDINATOR_ADDRESS)")
    a("--num-processes", type=int, default=None, help="with --distributed (default: auto-detected)")
    a("--process-id", type=int, default=None, help="with --distributed (default: auto-detected)")
    a("--resume", action="store_true",
      help="continue the run in OUT from its checkpoint (an error if it has none)")
    a("--overwrite", action="store_true",
      help="replace the run already in OUT, deleted once the new run has its first "
           "checkpoint (default: refuse a used OUT)")
    a("--no-progress", action="store_true", help="hide the progress bar")
    p.flags["progress"] = "--no-progress"
    a("--no-compile-cache", action="store_true",
      help="do not keep compiled programs in JAX's persistent compilation cache (default: on, "
           "in $JAX_COMPILATION_CACHE_DIR or ~/.cache/sevo_jax/jax/<this CPU>; later runs and "
           "resumes then skip most compiling)")
    p.flags["compile_cache"] = "--no-compile-cache"
    a("--data-stats", action="store_true",
      help="load the data, print its statistics as JSON and exit without training")
    return p


def config_from_args(args: argparse.Namespace) -> training.TrainConfig:
    """The run's config; every field is checked before the data's format is detected from
    its content (the only thing here that reads the data)."""
    fields = {f.name for f in dataclasses.fields(training.TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    # until the content says which, a file format that no setting is refused for
    placeholder = "synthetic" if args.data is None else "csv"
    values.update(format=args.format or placeholder, progress=not args.no_progress,
                  compile_cache=not args.no_compile_cache)
    config = training.TrainConfig(**values)
    config.validate()
    if args.format is None and args.data is not None:
        config = dataclasses.replace(config, format=data_lib.detect_format(args.data))
        config.validate()  # the settings that depend on the format (--keep-duplicates)
    return config


def data_stats(config: training.TrainConfig) -> dict:
    """The statistics of ``config``'s data set as the run would load it."""
    ds = data_lib.load_dataset(config.format, config.data, cache_dir=config.cache_dir,
                               kcore=config.kcore, keep_duplicates=config.keep_duplicates)
    return {"data": config.data, "format": config.format, **ds.stats()}


def format_table(results: dict) -> str:
    keys = ["HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"]
    rows = [f"| split | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|"]
    for split in ("valid", "test"):
        if results.get(split):
            cells = " | ".join(f"{results[split][k]:.4f}" for k in keys)
            rows.append(f"| {split} | {cells} |")
    return "\n".join(rows)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is numpy's or XLA's report of an allocation that failed."""
    import jax

    return isinstance(error, MemoryError) or (
        isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error))


def main(argv: list[str] | None = None) -> int:
    host_memory.keep_freed_memory()  # before JAX starts its threads (sevo_jax/host_memory.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [f for f in ("coordinator", "num_processes", "process_id")
             if getattr(args, f) is not None]
    if given and not args.distributed:
        parser.error(f"--{given[0].replace('_', '-')} needs --distributed")
    if args.distributed:  # before anything touches a device
        import jax

        try:
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        except (RuntimeError, ValueError, TypeError) as e:  # e.g. no coordinator address found
            sys.stderr.write(f"{PROG}: error: jax.distributed.initialize(): "
                             f"{' '.join(str(e).split())}\n")
            return 2
    try:
        config = config_from_args(args)
        if args.data_stats:
            print(json.dumps(data_stats(config)))
            return 0
        results = training.fit(config, resume=args.resume, overwrite=args.overwrite)
    except training.ConfigError as e:  # name the flag, not the config field
        sys.stderr.write(f"{PROG}: error: {parser.flags.get(e.field, e.field)} {e.problem}\n")
        return 2
    # DataError is a ValueError; OverflowError: a setting too large for JAX's int32/int64
    except (ValueError, TypeError, OSError, OverflowError, FloatingPointError) as e:
        hint = ("; a setting is too large (--features, --maxlen, --batch-size, ...)"
                if isinstance(e, OverflowError) else "")
        sys.stderr.write(f"{PROG}: error: {' '.join(str(e).split())}{hint}\n")
        return 2
    except KeyboardInterrupt:
        if training.has_checkpoint(args.out):
            sys.stderr.write(f"{PROG}: interrupted; resume with --resume --out {args.out}\n")
        else:  # nothing of this run was kept (an overwritten run is back in place)
            sys.stderr.write(f"{PROG}: interrupted before the run's first checkpoint; "
                             "nothing to resume\n")
        return 130
    except Exception as e:  # out of host or device memory: one line, not XLA's traceback
        if not out_of_memory(e):
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        sys.stderr.write(f"{PROG}: error: out of memory ({' '.join(first.split())[:200]}); "
                         "lower --batch-size, --eval-batch-size, --features or --maxlen\n")
        return 2
    print(f"best epoch {results['best_epoch']} of {results['epochs_run']}; "
          f"results in {args.out}/results.json")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
