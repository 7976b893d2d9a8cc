"""Command line: ``sevo-train`` / ``python -m sevo_jax.train``.

With no arguments it trains SASRec with SEvo-AdamW on the built-in synthetic data set.
Every flag maps onto one field of :class:`sevo_jax.training.TrainConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from sevo_jax import data as data_lib
from sevo_jax import training

PROG = "sevo-train"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of the whole usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{PROG}: error: {message} (see {PROG} --help)\n")
        raise SystemExit(2)


def _infer_format(path: str) -> str:
    p = Path(path)
    if p.is_dir() or p.name in ("u.data", "ratings.dat"):
        return "movielens"
    if p.suffix.lower() == ".csv":
        return "csv"
    return "seqtxt"


def build_parser() -> argparse.ArgumentParser:
    d = training.TrainConfig()
    p = _Parser(prog=PROG, description="Train SASRec / GRU4Rec / MF-BPR with or without SEvo.")
    a = p.add_argument
    a("--model", choices=training.MODELS, default=d.model)
    a("--data", default=None, help="data file or directory (omit for the synthetic set)")
    a("--format", choices=data_lib.FORMATS, default=None,
      help="data format (default: inferred from --data; synthetic without --data)")
    a("--optimizer", choices=training.OPTIMIZERS, default=d.optimizer)
    a("--graph", choices=training.GRAPHS, default=d.graph,
      help="prior graph for SEvo (auto: co-occurrence, user-item for mfbpr)")
    a("--epochs", type=int, default=None, help="default: 200 SASRec, 300 GRU4Rec, 40 synthetic")
    a("--batch-size", type=int, default=None, help="default: 512 (128 for SASRec on MovieLens)")
    a("--lr", type=float, default=None, help="default: 1e-3 (0.1 for sgd)")
    a("--weight-decay", type=float, default=None, help="default: 0.1 for adamw, else 0")
    a("--b1", type=float, default=d.b1)
    a("--b2", type=float, default=d.b2)
    a("--momentum", type=float, default=None, help="sgd momentum (default: none)")
    a("--beta", type=float, default=d.beta, help="SEvo smoothing strength in [0, 1)")
    a("--num-layers", type=int, default=d.num_layers, help="SEvo layers L")
    a("--approx", choices=training.APPROXIMATIONS, default=d.approx)
    a("--H", type=int, default=d.H, help="co-occurrence walk length")
    a("--maxlen", type=int, default=None, help="default: 50 (200 on MovieLens)")
    a("--dropout", type=float, default=None)
    a("--features", type=int, default=d.features)
    a("--seed", type=int, default=d.seed)
    a("--eval-every", type=int, default=d.eval_every)
    a("--patience", type=int, default=d.patience,
      help="stop after this many evaluations without a better validation NDCG@10 "
           "(default: off, train all epochs as the paper does)")
    a("--eval-batch-size", type=int, default=d.eval_batch_size)
    a("--kcore", type=int, default=d.kcore)
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
    a("--resume", action="store_true", help="continue from OUT/checkpoint.msgpack")
    a("--no-progress", action="store_true", help="hide the progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> training.TrainConfig:
    fmt = args.format or ("synthetic" if args.data is None else _infer_format(args.data))
    fields = {f.name for f in dataclasses.fields(training.TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update(format=fmt, progress=not args.no_progress)
    return training.TrainConfig(**values)


def format_table(results: dict) -> str:
    keys = ["HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"]
    rows = [f"| split | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|"]
    for split in ("valid", "test"):
        if results.get(split):
            rows.append(f"| {split} | " + " | ".join(f"{results[split][k]:.4f}" for k in keys) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [f for f in ("coordinator", "num_processes", "process_id") if getattr(args, f) is not None]
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
        results = training.fit(config, resume=args.resume)
    except (ValueError, TypeError, OSError, FloatingPointError) as e:  # DataError is a ValueError
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted; resume with --resume --out {args.out}\n")
        return 130
    print(f"best epoch {results['best_epoch']} of {results['epochs_run']}; results in {args.out}/results.json")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
