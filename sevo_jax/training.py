"""Training sequential recommenders with (or without) SEvo: config, batches, step, evaluation.

``fit(config)`` trains one model on one data set as in spec §4 and returns the results dict
that the CLI writes to ``results.json``. Everything is a function of ``config.seed``: the
parameter init, each epoch's shuffle and negatives (``default_rng([seed, epoch])``) and the
dropout keys (``fold_in(seed, epoch, step)``), so a resumed run equals an uninterrupted one.

``config.mesh = "NAME=SIZE"`` (CLI ``--mesh data=8``) trains on a one-axis device mesh: the
embedding tables SEvo smooths (``models.sevo_mask``) and their optimizer state are split BY
ROWS over the axis, the batch by examples over the same axis, everything else is replicated
(``sevo_jax.sharding.MeshPlan``). Tables are padded with zero rows to a multiple of SIZE; the
padding ids are isolated graph nodes, never sampled as negatives and excluded from ranking, and
their rows stay exactly zero, so a sharded run computes what the unsharded one does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse as sp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sevo_jax import checkpoint as checkpoint_lib
from sevo_jax import data as data_lib
from sevo_jax import graph as graph_lib
from sevo_jax import metrics as metrics_lib
from sevo_jax import models
from sevo_jax import sharding as sharding_lib
from sevo_jax.optimizers import sevo_adam, sevo_adamw, sevo_sgd

try:
    import fcntl
except ImportError:  # not POSIX: output folders are not locked
    fcntl = None  # type: ignore[assignment]  # mypy checks as on POSIX, where it is a module

MODELS = ("sasrec", "gru4rec", "bert4rec", "stosa", "mfbpr")
SEQUENCE_MODELS = ("sasrec", "bert4rec", "stosa")  # a hidden state per position; score the last
OPTIMIZERS = ("adamw", "sevo-adamw", "adam", "sevo-adam", "sgd", "sevo-sgd")
GRAPHS = ("auto", "cooccurrence", "category", "user-item")
APPROXIMATIONS = ("neumann", "iterative", "nsa")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. ``None`` fields take the spec §4 default for the model and data set."""

    model: str = "sasrec"
    data: str | None = None
    format: str = "synthetic"
    optimizer: str = "sevo-adamw"
    graph: str = "auto"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    b1: float = 0.9
    b2: float | None = None
    eps: float = 1e-8
    momentum: float | None = None
    beta: float | None = None
    num_layers: int = 3
    approx: str = "neumann"
    H: int = 1
    maxlen: int | None = None
    features: int = 64
    num_blocks: int | None = None
    num_heads: int | None = None
    dropout: float | None = None
    attention_dropout: float | None = None  # BERT4Rec, STOSA (SASRec's attention uses dropout)
    dropout_bits: int | None = None  # SASRec, BERT4Rec, STOSA: random bits per dropout decision
    mask_prob: float | None = None  # BERT4Rec's cloze masking probability
    pvn_weight: float | None = None  # STOSA's positive-vs-negative term
    length_bucket: int | None = None  # trim batches' leading padding to a multiple of this
    pack_rows: bool | None = None  # SASRec, BERT4Rec, STOSA: pack each batch's sequences
    lr_decay_factor: float = 1.0  # lr *= factor every lr_decay_every epochs (BERT4Rec's StepLR)
    lr_decay_every: int = 25
    seed: int = 0
    eval_every: int = 5
    patience: int | None = None  # off: SEvo's slower plateaus outlast short patience (RESULTS.md)
    eval_batch_size: int = 1024
    kcore: int = 0
    keep_duplicates: bool = False  # keep exact duplicate (user, item, time) rows of the data
    cache_dir: str | None = None
    out: str = "runs/latest"
    progress: bool = True
    mesh: str | None = None  # "NAME=SIZE": shard tables by rows and batches over SIZE devices
    compile_cache: bool = True  # JAX's persistent compilation cache (enable_compile_cache)

    def validate(self) -> None:
        """Check every field's type and range; raise :class:`ConfigError` naming the first bad one.

        A field that ``model`` does not read (``MODEL_SPECIFIC_FIELDS``), set anyway, is bad too:
        an error, not a silent no-op; so is one that ``optimizer`` does not read
        (``OPTIMIZER_FIELDS``) set to other than its default. Cheap and reads no data, so a bad
        value fails before any work is done.
        """
        for field in dataclasses.fields(self):
            if field.name not in _FIELD_RULES:  # a new field must say what values it takes
                raise TypeError(f"TrainConfig.{field.name} has no rule in training._FIELD_RULES")
            problem = _FIELD_RULES[field.name](getattr(self, field.name))
            if problem:
                raise ConfigError(field.name, f"{problem}, got {getattr(self, field.name)!r}")
        if self.format == "synthetic" and self.data is not None:
            raise ConfigError("format", "'synthetic' takes no data path; pass --format for --data")
        if self.format != "synthetic" and self.data is None:
            raise ConfigError("data", f"is needed by format {self.format!r}")
        if self.model != "mfbpr" and self.graph == "user-item":
            raise ConfigError("graph", f"'user-item' needs a model with a user table (mfbpr), "
                              f"not {self.model}")
        heads = self.num_heads or MODEL_DEFAULTS[self.model].get("num_heads", (1,))[0]
        if self.model in SEQUENCE_MODELS and self.features % heads:
            raise ConfigError("features", f"{self.features} must be a multiple of num_heads "
                              f"{heads} (each head gets features / num_heads)")
        if self.model == "bert4rec" and self.maxlen is not None and self.maxlen < 2:
            raise ConfigError("maxlen", f"must be at least 2 for bert4rec (a test input is the "
                              f"validation item and the mask token), got {self.maxlen}")
        for name in unread_fields(self.model):
            if getattr(self, name) is not None:
                users = MODEL_SPECIFIC_FIELDS[name]
                names = ", ".join(users[:-1]) + " and " * (len(users) > 1) + users[-1]
                raise ConfigError(name, f"applies to {names} only; {self.model} does not use it")
        unset = TrainConfig()
        defaults = dataclasses.replace(unset, model=self.model, format=self.format,
                                       optimizer=self.optimizer).resolved()
        unread = unread_optimizer_fields(self.optimizer)
        for name in (n for n in OPTIMIZER_FIELDS if n in unread):  # in the table's order
            if getattr(self, name) not in (getattr(unset, name), getattr(defaults, name)):
                raise ConfigError(name, f"applies to {', '.join(OPTIMIZER_FIELDS[name])} only; "
                                  f"{self.optimizer} does not use it")
        self._refuse_settings_without_effect(unset, defaults)
        if self.lr_decay_factor > 1.0:  # a growing learning rate must stay a float32
            lr = self.lr if self.lr is not None else defaults.lr
            epochs = self.epochs if self.epochs is not None else defaults.epochs
            assert lr is not None and epochs is not None  # resolved() sets both
            growths = (epochs - 1) // self.lr_decay_every
            peak = math.log10(lr) + growths * math.log10(self.lr_decay_factor)
            if growths and peak >= math.log10(float(np.finfo(np.float32).max)):
                raise ConfigError("lr_decay_factor", f"{self.lr_decay_factor:g} takes the "
                                  f"learning rate {lr:g} to about 1e{peak:.0f} by epoch "
                                  f"{growths * self.lr_decay_every + 1}, beyond float32")
        if self.length_bucket is not None and self.model == "mfbpr":
            raise ConfigError("length_bucket", "applies to sequence models; mfbpr has no "
                              "sequences")
        if self.mesh is not None:
            _, size = sharding_lib.parse_mesh_spec(self.mesh)
            if self.batch_size is not None and self.batch_size % size:
                raise ConfigError("batch_size", f"{self.batch_size} must be a multiple of the mesh "
                                  f"size {size} (mesh {self.mesh!r}): the batch is split over it")

    def _refuse_settings_without_effect(self, unset: TrainConfig, defaults: TrainConfig) -> None:
        """Settings that this combination of model, optimizer, graph and data never reads,
        set to other than their defaults: a ``ConfigError`` (values equal to the default pass)."""
        sevo = self.optimizer.startswith("sevo")
        graph = graph_kind(self)
        if sevo and graph != "cooccurrence" and self.H != unset.H:
            raise ConfigError("H", f"applies to the co-occurrence graph only; the {graph} graph "
                              "does not use it")
        if self.model == "mfbpr" and self.dropout not in (None, 0.0):
            raise ConfigError("dropout", "applies to sasrec, gru4rec, bert4rec and stosa only; "
                              "mfbpr has no dropout")
        if (self.maxlen not in (None, defaults.maxlen)
                and not reads_maxlen(self.model, self.graph, self.optimizer)):
            raise ConfigError("maxlen", "applies to mfbpr only on the co-occurrence graph of a "
                              "SEvo optimizer (it caps the sequences the graph is counted from)")
        if self.lr_decay_factor == 1.0 and self.lr_decay_every != unset.lr_decay_every:
            raise ConfigError("lr_decay_every", "has no effect while --lr-decay-factor is 1 (no "
                              "decay); set both")
        if self.keep_duplicates and self.format in ("seqtxt", "synthetic"):
            raise ConfigError("keep_duplicates", f"applies to timestamped rows (csv, movielens); "
                              f"{self.format} data has no duplicate rows to keep")
        if self.format == "synthetic" and self.cache_dir is not None:
            raise ConfigError("cache_dir", "applies to data read from a file; the synthetic set "
                              "is generated, never cached")

    def resolved(self) -> TrainConfig:
        """Fill the ``None`` defaults: the reference's config of ``model`` (``MODEL_DEFAULTS``:
        its Amazon Beauty values, its MovieLens-1M values with ``format="movielens"``); 40
        epochs on the synthetic set; lr 0.1 and no weight decay for sgd, no weight decay for
        adam. Fields a model does not use stay None."""
        movielens = self.format == "movielens"
        defaults: dict[str, Any] = {k: v[1] if movielens else v[0]
                                    for k, v in MODEL_DEFAULTS[self.model].items()}
        if self.optimizer.endswith("sgd"):
            defaults["lr"] = 1e-1
        if not self.optimizer.endswith("adamw"):
            defaults["weight_decay"] = 0.0
        if self.model == "mfbpr" and self.graph not in ("auto", "user-item"):
            defaults["beta"] = MFBPR_ITEM_GRAPH_BETA
        if self.format == "synthetic":
            defaults["epochs"] = 40
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **filled)


# The reference's per-model configs (MTandHJ/SEvo ``<model>/configs/AmazonBeauty_550_Chron.yaml``,
# ``MovieLens1M_550_Chron.yaml``): field -> (Amazon Beauty value, MovieLens value). SASRec and
# GRU4Rec on MovieLens follow spec §4 (the values RESULTS.md's MovieLens runs used). MF-BPR has
# the Beauty values on MovieLens too, and beta 0.99 on the user-item graph and
# ``MFBPR_ITEM_GRAPH_BETA`` on an item graph (``MF-BPR/item-item/AmazonBeauty_550_Chron.yaml``).
# ``length_bucket`` and ``pack_rows`` are not the reference's: they set batch shapes, not the
# model (``Examples.epoch_batches``).
MODEL_DEFAULTS: dict[str, dict[str, tuple[Any, Any]]] = {
    "sasrec": {"epochs": (200, 200), "batch_size": (512, 128), "maxlen": (50, 200),
               "dropout": (0.3, 0.1), "lr": (1e-3, 1e-3), "weight_decay": (0.1, 0.1),
               "b2": (0.98, 0.98), "beta": (0.99, 0.99), "num_blocks": (2, 2),
               "num_heads": (1, 1), "dropout_bits": (16, 16), "pack_rows": (True, True)},
    "gru4rec": {"epochs": (300, 300), "batch_size": (512, 512), "maxlen": (50, 200),
                "dropout": (0.4, 0.4), "lr": (1e-3, 1e-3), "weight_decay": (0.1, 0.1),
                "b2": (0.98, 0.98), "beta": (0.99, 0.99)},
    "bert4rec": {"epochs": (500, 500), "batch_size": (256, 256), "maxlen": (50, 200),
                 "dropout": (0.2, 0.1), "attention_dropout": (0.2, 0.1), "lr": (5e-4, 1e-3),
                 "weight_decay": (0.1, 0.1), "b2": (0.95, 0.999), "beta": (0.99, 0.99),
                 "num_blocks": (2, 2), "num_heads": (4, 4), "mask_prob": (0.5, 0.2),
                 "dropout_bits": (16, 16), "pack_rows": (True, True)},
    "stosa": {"epochs": (500, 500), "batch_size": (256, 256), "maxlen": (100, 200),
              "dropout": (0.2, 0.1), "attention_dropout": (0.5, 0.2), "lr": (1e-3, 5e-3),
              "weight_decay": (0.1, 0.1), "b2": (0.999, 0.999), "beta": (0.99, 0.99),
              "num_blocks": (1, 1), "num_heads": (4, 4), "pvn_weight": (0.005, 0.001),
              "dropout_bits": (16, 16), "pack_rows": (True, True)},
    "mfbpr": {"epochs": (1000, 1000), "batch_size": (2048, 2048), "maxlen": (50, 50),
              "dropout": (0.0, 0.0), "lr": (1e-3, 1e-3), "weight_decay": (0.1, 0.1),
              "b2": (0.98, 0.98), "beta": (0.99, 0.99)},
}
MFBPR_ITEM_GRAPH_BETA = 0.9
# fields that only some models read (those that some models' defaults name): setting one for
# another model is an error, not a silent no-op. ``length_bucket`` has its own rule (every
# sequence model takes it).
MODEL_SPECIFIC_FIELDS: dict[str, tuple[str, ...]] = {
    name: tuple(m for m, fields in MODEL_DEFAULTS.items() if name in fields)
    for name in sorted({f for fields in MODEL_DEFAULTS.values() for f in fields})
    if name != "length_bucket" and not all(name in f for f in MODEL_DEFAULTS.values())}


def unread_fields(model: str | None) -> frozenset[str]:
    """The ``MODEL_SPECIFIC_FIELDS`` that ``model`` does not read.

    Examples:
      >>> sorted(unread_fields("gru4rec"))[:2]
      ['attention_dropout', 'dropout_bits']
    """
    return frozenset(name for name, users in MODEL_SPECIFIC_FIELDS.items() if model not in users)


# Fields that only some optimizers read: SEvo's (the graph and psi) and Adam's or SGD's own.
# Setting one to other than its default for an optimizer that ignores it is an error.
OPTIMIZER_FIELDS: dict[str, tuple[str, ...]] = {
    **{name: ("sevo-adamw", "sevo-adam", "sevo-sgd")
       for name in ("graph", "beta", "num_layers", "approx", "H")},
    **{name: ("adamw", "sevo-adamw", "adam", "sevo-adam") for name in ("b1", "b2", "eps")},
    "momentum": ("sgd", "sevo-sgd"),
}


def unread_optimizer_fields(optimizer: str) -> frozenset[str]:
    """The ``OPTIMIZER_FIELDS`` that ``optimizer`` does not read.

    Examples:
      >>> sorted(unread_optimizer_fields("sevo-adamw"))
      ['momentum']
    """
    return frozenset(name for name, users in OPTIMIZER_FIELDS.items() if optimizer not in users)


class ConfigError(ValueError):
    """A bad :class:`TrainConfig` field; ``field`` names it (the CLI shows its flag instead)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)) and bool(np.isfinite(value))


def _choice(allowed: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"must be one of {', '.join(allowed)}"


def _integer(low: int, optional: bool = False, below: int = 2**63) -> Callable[[Any], str | None]:
    def check(v):
        if v is None and optional:
            return None
        if not _is_int(v) or not low <= v < below:
            bound = "" if below == 2**63 else f" below {below:,}"
            return ("must be a positive integer" if low == 1 else
                    f"must be an integer >= {low}") + bound
        return None
    return check


def _number(low: float, high: float | None = None, *, low_open: bool = False,
            optional: bool = False) -> Callable[[Any], str | None]:
    """A finite number in [low, high) ((low, high) with ``low_open``)."""
    def check(v):
        if v is None and optional:
            return None
        above = _is_real(v) and (v > low if low_open else v >= low)
        if not above or (high is not None and not v < high):
            lo = f"({low}" if low_open else f"[{low}"
            return (f"must be a finite number > {low}" if low_open and high is None else
                    f"must be a finite number >= {low}" if high is None else
                    f"must lie in {lo}, {high})")
        return None
    return check


def _text(optional: bool) -> Callable[[Any], str | None]:
    def check(v):
        if v is None and optional:
            return None
        return None if isinstance(v, str) and v.strip() else "must be a non-empty string"
    return check


def _flag(v: Any) -> str | None:
    return None if isinstance(v, (bool, np.bool_)) else "must be True or False"


# One rule per TrainConfig field: None if the value is fine, else what it must be.
_FIELD_RULES: dict[str, Callable[[Any], str | None]] = {
    "model": _choice(MODELS), "data": _text(optional=True), "format": _choice(data_lib.FORMATS),
    "optimizer": _choice(OPTIMIZERS), "graph": _choice(GRAPHS),
    "epochs": _integer(1, optional=True), "batch_size": _integer(1, optional=True),
    "lr": _number(0, low_open=True, optional=True), "weight_decay": _number(0, optional=True),
    "b1": _number(0, 1), "b2": _number(0, 1, optional=True), "eps": _number(0, low_open=True),
    "momentum": _number(0, 1, optional=True), "beta": _number(0, 1, optional=True),
    "num_layers": _integer(0),
    "approx": _choice(APPROXIMATIONS), "H": _integer(1), "maxlen": _integer(1, optional=True),
    "features": _integer(1), "num_blocks": _integer(1, optional=True),
    "num_heads": _integer(1, optional=True), "dropout": _number(0, 1, optional=True),
    "attention_dropout": _number(0, 1, optional=True),
    "dropout_bits": lambda v: None if v in (None, 16, 32) else "must be 16 or 32",
    "mask_prob": _number(0, 1, low_open=True, optional=True),
    "length_bucket": _integer(1, optional=True),
    "pack_rows": lambda v: None if v is None else _flag(v),
    "pvn_weight": _number(0, optional=True), "lr_decay_factor": _number(0, low_open=True),
    "lr_decay_every": _integer(1), "seed": _integer(0, below=2**32),  # PRNGKey keeps 32 bits
    "eval_every": _integer(1),
    "patience": _integer(1, optional=True), "eval_batch_size": _integer(1), "kcore": _integer(0),
    "keep_duplicates": _flag, "cache_dir": _text(optional=True), "out": _text(optional=False),
    "progress": _flag, "mesh": _text(optional=True), "compile_cache": _flag,
}


def graph_kind(config: TrainConfig) -> str:
    """``config.graph`` with ``auto`` resolved: user-item for MF-BPR, else co-occurrence."""
    if config.graph != "auto":
        return config.graph
    return "user-item" if config.model == "mfbpr" else "cooccurrence"


def reads_maxlen(model: str, graph: str = "auto", optimizer: str = "sevo-adamw") -> bool:
    """Whether a run reads ``maxlen``: every sequence model does; MF-BPR (no sequences) only
    to count a SEvo optimizer's co-occurrence graph from the training sequences."""
    if model != "mfbpr":
        return True
    return optimizer.startswith("sevo") and graph_kind(
        TrainConfig(model=model, graph=graph)) == "cooccurrence"


def smoothed_tables(config: TrainConfig) -> tuple[str, ...]:
    """The modules whose tables SEvo smooths, as the reference's optimizer param groups:
    the item table (SASRec, GRU4Rec); the item table and the output layer (BERT4Rec); the
    mean and covariance tables (STOSA); users and items on the user-item graph, the item
    table alone on an item graph (MF-BPR, ``MF-BPR/main.py`` vs ``main2.py``)."""
    if config.model == "bert4rec":
        return ("item_embedding", "output_embedding")
    if config.model == "stosa":
        return ("covariance_embedding", "mean_embedding")
    if config.model == "mfbpr":
        users = ("table_0_users",) if graph_kind(config) == "user-item" else ()
        return users + ("table_1_items",)
    return ("item_embedding",)


def table_mask(config: TrainConfig) -> Callable[[Any], Any]:
    """``params -> pytree of bools``: ``models.sevo_mask`` over ``smoothed_tables(config)``."""
    return functools.partial(models.sevo_mask, tables=smoothed_tables(config))


def mesh_plan(config: TrainConfig) -> sharding_lib.MeshPlan | None:
    """Where a run's arrays live on ``config.mesh`` (None: one device); tables = ``table_mask``."""
    if config.mesh is None:
        return None
    return sharding_lib.MeshPlan(sharding_lib.build_mesh(config.mesh), table_mask(config))


# ---- data to batches ----------------------------------------------------------------------------


def left_padded(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, maxlen: int) -> np.ndarray:
    """Rows ``items[starts[r]:ends[r]]`` cut to their last ``maxlen`` and left-padded with 0."""
    idx = ends[:, None] - maxlen + np.arange(maxlen)[None, :]
    valid = idx >= starts[:, None]
    return np.where(valid, items[np.clip(idx, 0, max(items.size - 1, 0))], 0).astype(np.int32)


class NegativeSampler:
    """Uniform items in ``1..num_items`` that the user never interacted with in training."""

    def __init__(self, dataset: data_lib.SequenceDataset):
        users, items = dataset.train_pairs()
        self.num_items = dataset.num_items
        self.stride = dataset.num_items + 1
        self.seen = np.unique(users.astype(np.int64) * self.stride + items)

    def _is_seen(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users.astype(np.int64) * self.stride + items
        pos = np.minimum(np.searchsorted(self.seen, keys), self.seen.size - 1)
        return self.seen[pos] == keys

    def sample(self, users: np.ndarray, rng: np.random.Generator, rounds: int = 50) -> np.ndarray:
        """One negative per entry of ``users`` (any shape), by vectorised rejection sampling."""
        users = np.asarray(users)
        out = rng.integers(1, self.num_items + 1, size=users.shape)
        todo = self._is_seen(users, out)
        for _ in range(rounds):
            if not todo.any():
                break
            out[todo] = rng.integers(1, self.num_items + 1, size=int(todo.sum()))
            todo[todo] = self._is_seen(users[todo], out[todo])
        return out.astype(np.int32)


@dataclasses.dataclass
class Examples:
    """Fixed training examples of one model; ``epoch_batches`` adds shuffling and negatives
    (or, with ``mask_prob``, the cloze masks of BERT4Rec)."""

    arrays: dict[str, np.ndarray]   # every array has the examples on axis 0
    users: np.ndarray               # the user of each example (for negative sampling)
    target_key: str                 # the array whose items get negatives (or are masked)
    mask_prob: float | None = None  # cloze: mask each item of target_key with this probability
    mask_id: int = 0                # ... replacing it by this id
    length_bucket: int | None = None  # trim each batch's leading padding columns (see below)
    pack_rows: bool = False         # pack each batch's sequences into fewer rows (see below)
    row_multiple: int = 1           # ... a multiple of this many (a mesh's batch axis)

    def __len__(self) -> int:
        return self.users.shape[0]

    def has_targets(self) -> bool:
        """Whether any example has an item to learn."""
        return bool((self.arrays[self.target_key] != 0).any())

    def epoch_batches(
        self, sampler: NegativeSampler, batch_size: int, rng: np.random.Generator
    ) -> Iterator[dict[str, np.ndarray]]:
        """Shuffled fixed-size batches; the last is padded with all-zero (masked) examples.

        Cloze (``mask_prob``): each non-padding item of ``target_key`` is masked with
        probability ``mask_prob`` (replaced by ``mask_id``); ``cloze_index`` holds the flat
        indices of the masked positions in the batch's ``(B, T)`` and ``cloze_labels`` their
        items, both padded with 0 (``cloze_size``: few distinct shapes under jit).

        ``length_bucket``: the 2-D arrays (``(B, T)``, left-padded) drop their leading columns
        that are padding in every example of the batch, keeping the smallest multiple of
        ``length_bucket`` (at most ``T``) that holds every item. Models with right-aligned
        positions and masked padding keys compute the same hidden states for the items; only
        the dropout masks, drawn per shape, differ.

        ``pack_rows``: the sequences are then packed into fewer rows (:func:`pack_rows`, which
        adds ``positions`` and ``segments``); the model, given those, computes the same hidden
        states for the items, and the losses are means over items: the same loss and gradient,
        other dropout draws.
        """
        order = rng.permutation(len(self))
        targets = self.arrays[self.target_key]
        if self.mask_prob is None:
            users = np.broadcast_to(self.users.reshape((-1,) + (1,) * (targets.ndim - 1)),
                                    targets.shape)
            negatives = sampler.sample(users, rng)
        else:
            draws = rng.random(targets.shape) < self.mask_prob
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v[idx] for k, v in self.arrays.items()}
            if self.mask_prob is None:
                batch["negatives"] = negatives[idx]
            pad = batch_size - idx.size
            if pad:
                batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                         for k, v in batch.items()}
            if self.length_bucket is not None:
                batch = trimmed_padding(batch, self.length_bucket,
                                        ("inputs", self.target_key))
            if self.mask_prob is not None:
                items = batch[self.target_key]
                masked = np.zeros(items.shape, bool)
                kept = draws[idx][:, targets.shape[1] - items.shape[1]:]  # trimmed columns
                masked[:idx.size] = kept & (items[:idx.size] != 0)
                if self.pack_rows:
                    packed = pack_rows({"items": items, "masked": masked}, self.row_multiple)
                    items, masked = packed.pop("items"), packed.pop("masked").astype(bool)
                    batch = packed
                batch.update(cloze_batch(items, masked, self.mask_id))
            elif self.pack_rows:
                batch = pack_rows(batch, self.row_multiple)
            yield batch


def trimmed_padding(batch: dict[str, np.ndarray], bucket: int,
                    keys: tuple[str, ...] = ("inputs",)) -> dict[str, np.ndarray]:
    """``batch`` with the leading columns of its ``(B, T)`` arrays dropped where the ``keys``
    arrays are 0 in every row, keeping ``min(T, bucket * ceil(width / bucket))`` columns (at
    least ``bucket``); ``width`` counts the columns from the first non-zero one of ``keys`` on.
    (Other ``(B, T)`` arrays, such as negatives, are sliced alike but not looked at.)"""
    wide = [batch[k] for k in keys if k in batch and batch[k].ndim == 2]
    if not wide:
        return batch
    length = wide[0].shape[1]
    used = np.zeros(length, bool)
    for v in wide:
        used |= (v != 0).any(axis=0)
    width = length - int(np.argmax(used)) if used.any() else 0
    keep = min(length, bucket * max(1, -(-width // bucket)))
    return {k: v[:, length - keep:] if v.ndim == 2 else v for k, v in batch.items()}


def pack_rows(batch: dict[str, np.ndarray], row_multiple: int = 1) -> dict[str, np.ndarray]:
    """The left-padded ``(B, T)`` arrays of ``batch`` with their sequences packed into fewer rows,
    plus ``positions`` and ``segments`` ``(R, T)`` int32 (the models' packed-row inputs).

    A row's sequence is its columns from the first non-zero one of the first array on; each is
    placed whole in one packed row (first fit, longest first), right-aligned after the ones
    before it; ``positions`` holds each item's column before packing and ``segments`` its row
    number + 1 (0: padding). ``R`` is the packed rows' count rounded up to a multiple of 8 and
    of ``row_multiple`` (few shapes under jit, the same on every mesh of up to 8 devices) and,
    past 64, of an eighth of a power of two. The item states do not change if the model lets
    an item attend only within its segment.

    Examples:
      >>> b = pack_rows({"x": np.array([[0, 0, 1, 2], [0, 0, 0, 3], [0, 4, 5, 6]])})
      >>> b["x"][:2].tolist()        # [4, 5, 6] first, then [1, 2]; [3] fills row 0
      [[3, 4, 5, 6], [0, 0, 1, 2]]
      >>> b["segments"][:2].tolist(), b["positions"][:2].tolist()
      ([[2, 3, 3, 3], [0, 0, 1, 1]], [[3, 1, 2, 3], [0, 0, 2, 3]])
      >>> b["x"].shape                # 2 rows used, rounded up to 8
      (8, 4)
    """
    arrays = list(batch.values())
    first = arrays[0]
    if first.ndim != 2 or any(a.shape != first.shape for a in arrays):
        raise ValueError("pack_rows packs (B, T) arrays of one shape, got shapes "
                         f"{[a.shape for a in arrays]}")
    num, width = first.shape
    nonzero = first != 0
    lengths = np.where(nonzero.any(axis=1), width - np.argmax(nonzero, axis=1), 0)
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] > 0]
    free = np.zeros(len(order), np.int64)  # room left in each packed row, filled from the right
    used = 0
    row_of = np.empty(len(order), np.int64)
    end_of = np.empty(len(order), np.int64)  # the column after the sequence's last item
    for k, r in enumerate(order):
        fits = np.flatnonzero(free[:used] >= lengths[r])
        slot = int(fits[0]) if fits.size else used
        if slot == used:
            free[used], used = width, used + 1
        row_of[k], end_of[k] = slot, free[slot]
        free[slot] -= lengths[r]
    multiple = math.lcm(8, row_multiple)
    rows = -(-cloze_size(used, minimum=8) // multiple) * multiple
    # every item k of sequence r: from (r, width - len + k) to (row_of, end_of - len + k)
    lens = lengths[order]
    seq = np.repeat(np.arange(len(order)), lens)
    k = np.arange(seq.size) - np.repeat(np.cumsum(lens) - lens, lens)
    src_col = width - lens[seq] + k
    dst = row_of[seq] * width + end_of[seq] - lens[seq] + k
    src = order[seq] * width + src_col
    out = {}
    for key, a in batch.items():
        flat = np.zeros(rows * width, a.dtype)
        flat[dst] = a.reshape(-1)[src]
        out[key] = flat.reshape(rows, width)
    for key, values in (("positions", src_col), ("segments", order[seq] + 1)):
        flat = np.zeros(rows * width, np.int32)
        flat[dst] = values
        out[key] = flat.reshape(rows, width)
    return out


def cloze_batch(items: np.ndarray, masked: np.ndarray, mask_id: int) -> dict[str, np.ndarray]:
    """The masked items ``where(masked, mask_id, items)`` (``(B, T)``), the flat indices of the
    masked positions and their items, both padded with 0 to ``cloze_size`` of their count."""
    index = np.flatnonzero(masked).astype(np.int32)
    size = cloze_size(index.size)
    labels = items.reshape(-1)[index]
    return {"inputs": np.where(masked, mask_id, items).astype(np.int32),
            "cloze_index": np.pad(index, (0, size - index.size)),
            "cloze_labels": np.pad(labels, (0, size - index.size)).astype(np.int32)}


def cloze_size(n: int, minimum: int = 64) -> int:
    """The padded length of ``n`` cloze positions, at least ``minimum``: ``n`` rounded up to a
    multiple of an eighth of the largest power of two ``<= n``, so at most 8 jit shapes per
    doubling and less than ``n / 8`` padding (a power of two pads up to ``n``).

    Examples:
      >>> cloze_size(853), cloze_size(1024), cloze_size(1025), cloze_size(3)
      (896, 1024, 1152, 64)
    """
    n = int(n)
    step = max(1, (1 << max(n, 1).bit_length() - 1) // 8)
    return max(minimum, -(-n // step) * step)


def _power_of_two_at_least(n: int, minimum: int) -> int:
    """The smallest power of two >= ``n`` and >= ``minimum`` (a padded size: few jit shapes)."""
    return max(minimum, 1 << (max(int(n), 1) - 1).bit_length())


_T = TypeVar("_T")


def required(value: _T | None, name: str) -> _T:
    """A config field that ``TrainConfig.resolved`` fills; a clear error if it is still None.

    Examples:
      >>> required(50, "maxlen")
      50
    """
    if value is None:
        raise ValueError(f"config field {name} is None: call TrainConfig.resolved() first")
    return value


def training_examples(config: TrainConfig, ds: data_lib.SequenceDataset) -> Examples:
    """SASRec, STOSA: one sequence per user (inputs s[:-1], targets s[1:]); BERT4Rec: one
    sequence per user (its last ``maxlen`` items, cloze-masked per batch); GRU4Rec: every
    prefix of length >= 1 as input with its next item as target; MF-BPR: every (user, item)
    pair."""
    items, offsets = ds.train_items, ds.train_offsets
    starts, ends = offsets[:-1], offsets[1:]
    maxlen = required(config.maxlen, "maxlen") if config.model != "mfbpr" else 0
    pack = bool(config.pack_rows)
    # packed rows are split over the mesh's batch axis as batches are
    rows = 1 if config.mesh is None else sharding_lib.parse_mesh_spec(config.mesh)[1]
    if config.model == "bert4rec":
        inputs = left_padded(items, starts, ends, maxlen)
        return Examples({"inputs": inputs}, np.arange(ds.num_users), "inputs",
                        mask_prob=config.mask_prob, mask_id=ds.num_items + 1,
                        length_bucket=config.length_bucket, pack_rows=pack, row_multiple=rows)
    if config.model in ("sasrec", "stosa"):
        inputs = left_padded(items, starts, ends - 1, maxlen)
        targets = left_padded(items, starts + 1, ends, maxlen)
        return Examples({"inputs": inputs, "targets": targets}, np.arange(ds.num_users), "targets",
                        length_bucket=config.length_bucket, pack_rows=pack, row_multiple=rows)
    if config.model == "gru4rec":
        user_of = np.repeat(np.arange(ds.num_users), np.diff(offsets))
        k = np.flatnonzero(np.arange(items.size) > starts[user_of])
        inputs = left_padded(items, starts[user_of[k]], k, maxlen)
        return Examples({"inputs": inputs, "targets": items[k].astype(np.int32)}, user_of[k],
                        "targets", length_bucket=config.length_bucket)
    users, pair_items = ds.train_pairs()
    return Examples({"users": users.astype(np.int32), "targets": pair_items.astype(np.int32)},
                    users, "targets")


def eval_inputs(config: TrainConfig, ds: data_lib.SequenceDataset, split: str) -> np.ndarray:
    """Model inputs for ranking the ``split`` target: the training sequence (valid), or the
    training sequence followed by the validation item (test); user ids for MF-BPR. BERT4Rec's
    inputs end with the mask token (``num_items + 1``) after the last ``maxlen - 1`` items."""
    if config.model == "mfbpr":
        return np.arange(ds.num_users, dtype=np.int32)
    maxlen = required(config.maxlen, "maxlen")
    items, offsets = ds.train_items, ds.train_offsets
    width = maxlen - 1 if config.model == "bert4rec" else maxlen
    if split == "valid":
        seqs = left_padded(items, offsets[:-1], offsets[1:], width)
    else:
        head = left_padded(items, offsets[:-1], offsets[1:], width - 1)
        seqs = np.concatenate([head, ds.valid[:, None].astype(np.int32)], axis=1)
    if config.model == "bert4rec":
        mask = np.full((seqs.shape[0], 1), ds.num_items + 1, np.int32)
        seqs = np.concatenate([seqs, mask], axis=1)
    return seqs


# ---- model, graph, optimizer --------------------------------------------------------------------


def build_model(config: TrainConfig, ds: data_lib.SequenceDataset,
                row_multiple: int = 1) -> nn.Module:
    """The model of ``config.model``; ``row_multiple > 1`` sizes its tables (``num_items + 1``
    rows, MF-BPR's ``num_users``) up to a multiple of it (padding ids for a mesh)."""
    num_items = sharding_lib.pad_rows(ds.num_items + 1, row_multiple) - 1
    num_users = sharding_lib.pad_rows(ds.num_users, row_multiple)
    if config.model == "sasrec":
        return models.SASRec(num_items, required(config.maxlen, "maxlen"), config.features,
                             required(config.num_blocks, "num_blocks"),
                             required(config.num_heads, "num_heads"),
                             required(config.dropout, "dropout"),
                             dropout_bits=required(config.dropout_bits, "dropout_bits"))
    if config.model in ("bert4rec", "stosa"):
        encoder = (required(config.maxlen, "maxlen"), config.features,
                   required(config.num_blocks, "num_blocks"),
                   required(config.num_heads, "num_heads"),
                   required(config.dropout, "dropout"),
                   required(config.attention_dropout, "attention_dropout"))
        bits = required(config.dropout_bits, "dropout_bits")
        if config.model == "stosa":
            return models.STOSA(num_items, *encoder, dropout_bits=bits)
        # the mask token keeps its id; padding rows come after it
        return models.BERT4Rec(ds.num_items, *encoder,
                               table_rows=sharding_lib.pad_rows(ds.num_items + 2, row_multiple),
                               dropout_bits=bits)
    if config.model == "gru4rec":
        return models.GRU4Rec(num_items, config.features, required(config.dropout, "dropout"))
    return models.MFBPR(num_users, num_items, config.features)


def build_graph(config: TrainConfig, ds: data_lib.SequenceDataset) -> sp.csr_matrix:
    """The raw adjacency over the smoothed rows (``smoothed_tables``, stacked in flatten
    order), from TRAINING data only (spec §1).

    Item graphs have the padding id 0 as an isolated node (BERT4Rec also its mask token
    ``num_items + 1``). Two tables smoothed each on its own by the item graph ``A`` (BERT4Rec,
    STOSA) get ``diag(A, A)``; MF-BPR's user-item graph has the users first."""
    kind = graph_kind(config)
    if kind == "user-item":
        if config.model != "mfbpr":
            raise ValueError("graph 'user-item' needs a model with a user table (mfbpr), "
                             f"not {config.model}")
        users, items = ds.train_pairs()
        return graph_lib.user_item_graph(users, items - 1, ds.num_users, ds.num_items, num_pads=1)
    if kind == "category":
        if ds.item_categories is None:
            raise ValueError(f"graph 'category' needs item categories, which {ds.name} lacks")
        graph = sp.csr_matrix(graph_lib.category_graph(ds.item_categories))
    else:
        graph = graph_lib.cooccurrence_graph(
            [s - 1 for s in ds.train_sequences()], ds.num_items, H=config.H,
            maxlen=config.maxlen, num_pads=1)
    if graph.nnz == 0:  # psi would be the identity: a run called SEvo that smooths nothing
        why = ("no item has a category" if kind == "category" else
               f"no two items lie within --H {config.H} steps of each other in the last "
               f"--maxlen {config.maxlen} items of any training sequence")
        raise ValueError(f"the {kind} graph of {ds.name} has no edges ({why}), so "
                         f"{config.optimizer} would smooth nothing")
    if config.model == "bert4rec":  # the mask token: one more isolated node
        graph = sp.csr_matrix((graph.data, graph.indices, np.append(graph.indptr, graph.nnz)),
                              shape=(graph.shape[0] + 1, graph.shape[1] + 1))
    if len(smoothed_tables(config)) == 2 and config.model != "mfbpr":
        graph = sp.block_diag([graph, graph], format="csr")
    return graph


def build_optimizer(config: TrainConfig, adjacency: Any, mesh: Mesh | None = None,
                    steps_per_epoch: int | None = None) -> optax.GradientTransformation:
    """The six optimizers of the CLI; the ``sevo-*`` ones smooth the tables of ``table_mask``.

    ``config.lr_decay_factor != 1`` multiplies the learning rate by it every
    ``lr_decay_every`` epochs (PyTorch ``StepLR``, as the reference BERT4Rec), which needs
    ``steps_per_epoch``.

    With ``config.mesh`` the ``sevo-*`` ones run psi row-sharded over the mesh's axis (``mesh``
    defaults to ``sharding_lib.build_mesh(config.mesh)``); ``adjacency`` must then have one node
    per row of the PADDED tables (``MeshPlan.pad_adjacency``)."""
    c = config
    # repair=False: the trainer's states come from init or are restored into its template, so
    # the step needs no repair callback, and JAX's persistent compilation cache can keep it
    sevo: dict[str, Any] = dict(beta=c.beta, num_layers=c.num_layers, mask=table_mask(c),
                                approx=c.approx, repair=False)
    if c.mesh is not None and c.optimizer.startswith("sevo"):
        mesh = sharding_lib.build_mesh(c.mesh) if mesh is None else mesh
        sevo.update(mesh=mesh, axis_name=mesh.axis_names[0])
    lr: Any = c.lr
    if c.lr_decay_factor != 1.0:
        if steps_per_epoch is None:
            raise ValueError("lr_decay_factor != 1 needs steps_per_epoch (the decay is per epoch)")
        lr = optax.exponential_decay(c.lr, c.lr_decay_every * steps_per_epoch,
                                     c.lr_decay_factor, staircase=True)
    if c.optimizer == "adamw":
        return optax.adamw(lr, c.b1, c.b2, c.eps, weight_decay=c.weight_decay)
    if c.optimizer == "sevo-adamw":
        return sevo_adamw(lr, adjacency, b1=c.b1, b2=c.b2, eps=c.eps,
                          weight_decay=c.weight_decay, **sevo)
    if c.optimizer == "adam":
        return optax.chain(optax.add_decayed_weights(c.weight_decay),
                           optax.adam(lr, c.b1, c.b2, c.eps))
    if c.optimizer == "sevo-adam":
        return sevo_adam(lr, adjacency, b1=c.b1, b2=c.b2, eps=c.eps,
                         weight_decay=c.weight_decay, **sevo)
    if c.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(c.weight_decay), optax.sgd(lr, c.momentum))
    return sevo_sgd(lr, adjacency, momentum=c.momentum, weight_decay=c.weight_decay, **sevo)


def init_training(config: TrainConfig, ds: data_lib.SequenceDataset,
                  plan: sharding_lib.MeshPlan | None = None,
                  adjacency: Any = None
                  ) -> tuple[nn.Module, optax.GradientTransformation, Any, Any]:
    """``(model, optimizer, params, opt_state)`` of a resolved ``config``, seeded by its ``seed``.

    ``adjacency``: the raw graph (default ``build_graph``, for the ``sevo-*`` optimizers).
    With a ``plan`` the params are initialised exactly as without one, then the tables get
    zero padding rows (``MeshPlan.pad_params``), the graph matching isolated nodes, the model
    the padded sizes, and params and state are placed by ``plan``'s shardings. A bad
    ``config`` raises :class:`ConfigError` (``TrainConfig.validate``) before any work."""
    config.validate()
    model = build_model(config, ds)
    if adjacency is None and config.optimizer.startswith("sevo"):
        adjacency = build_graph(config, ds)
    steps = None
    if config.lr_decay_factor != 1.0:
        steps = math.ceil(len(training_examples(config, ds))
                          / required(config.batch_size, "batch_size"))
    init_input = (jnp.zeros((1,), jnp.int32) if config.model == "mfbpr"
                  else jnp.zeros((1, config.maxlen), jnp.int32))
    init_kwargs: dict[str, Any] = {} if config.model == "mfbpr" else {"deterministic": True}
    if plan is None:  # jit: same values as eager init, compiled in a third of the time
        params = jax.jit(lambda k: model.init(k, init_input, **init_kwargs)["params"])(
            jax.random.PRNGKey(config.seed))
        optimizer = build_optimizer(config, adjacency, steps_per_epoch=steps)
        return model, optimizer, params, optimizer.init(params)

    def init_padded(key):  # under jit, so no table is ever whole on one device
        unpadded = model.init(key, init_input, **init_kwargs)["params"]
        return plan.pad_params(unpadded)

    key = jax.random.PRNGKey(config.seed)
    shapes = jax.eval_shape(lambda k: model.init(k, init_input, **init_kwargs)["params"], key)
    if adjacency is not None:
        adjacency = plan.pad_adjacency(adjacency, shapes)
    params = jax.jit(init_padded, out_shardings=plan.param_shardings(shapes))(key)
    model = build_model(config, ds, plan.size)
    optimizer = build_optimizer(config, adjacency, plan.mesh, steps)
    opt_state = optimizer.init(params)
    opt_state = plan.put(opt_state, plan.state_shardings(opt_state, params, optimizer))
    return model, optimizer, params, opt_state


# ---- step and evaluation ------------------------------------------------------------------------

# Programs that take less than this to compile are not written to the persistent cache.
COMPILE_CACHE_MIN_SECONDS = 0.5


def default_compile_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sevo_jax/jax/<cpu>`` (``~/.cache`` without XDG_CACHE_HOME), where
    ``<cpu>`` is a short hash of this CPU's model and instruction-set flags: XLA:CPU programs
    are built for the CPU that compiled them, and a home folder may be shared by machines."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sevo_jax" / "jax" / _cpu_fingerprint()


def _cpu_fingerprint() -> str:
    described = [platform.machine(), platform.processor()]
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:  # Linux: the model and the flags of the first CPU
            described += [line for line in f.read().split("\n\n")[0].splitlines()
                          if line.startswith(("model name", "flags", "Features"))]
    return hashlib.sha256("\n".join(described).encode()).hexdigest()[:12]


def enable_compile_cache(directory: str | os.PathLike | None = None,
                         log: Callable[[str], None] = print) -> str | None:
    """Turn on JAX's persistent compilation cache, so that a later run of the same program
    (the same model, optimizer, data shapes and JAX), or a resumed run, loads its compiled
    train step and scorer from disk instead of compiling them again. The first run still
    compiles everything and writes the cache.

    ``directory`` defaults to ``default_compile_cache_dir()``. A cache directory already set
    (``jax.config.jax_compilation_cache_dir``, e.g. by ``$JAX_COMPILATION_CACHE_DIR``) is kept
    as it is. Programs compiling in under ``COMPILE_CACHE_MIN_SECONDS`` are not cached. The
    folder is not capped (a program is 0.1-1 MB; JAX's LRU cap needs ``filelock`` and breaks on
    a folder written without it) and may be deleted at any time. A directory that cannot be
    created leaves the cache off (with one line to ``log``).
    Returns the directory in use, or None when the cache stays off.
    """
    current = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]  # set at run time
    if current:
        return str(current)
    path = Path(directory) if directory is not None else default_compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log(f"compile cache off: cannot create {path} ({e.strerror or e})")
        return None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_CACHE_MIN_SECONDS)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return str(path)


def make_loss_fn(config: TrainConfig, model: nn.Module) -> Callable:
    """``loss(params, batch, dropout_key)``: BCE for SASRec (spec §4), cloze cross-entropy for
    BERT4Rec, BPR plus the positive-vs-negative term for STOSA, BPR otherwise."""

    def loss_fn(params, batch, key):
        variables = {"params": params}
        packed = {k: batch[k] for k in ("positions", "segments") if k in batch}  # pack_rows
        if config.model == "bert4rec":
            hidden = model.apply(variables, batch["inputs"], deterministic=False,
                                 rngs={"dropout": key}, **packed)
            hidden = cast(jax.Array, hidden)
            masked = hidden.reshape(-1, hidden.shape[-1])[batch["cloze_index"]]
            return cast(jax.Array, model.apply(variables, masked, batch["cloze_labels"],
                                               method="cloze_loss"))
        items = jnp.stack([batch["targets"], batch["negatives"]], axis=-1)
        if config.model == "mfbpr":
            hidden = model.apply(variables, batch["users"])
        else:
            hidden = model.apply(variables, batch["inputs"], deterministic=False,
                                 rngs={"dropout": key}, **packed)
        logits = cast(jax.Array, model.apply(variables, hidden, items, method="score"))
        mask = batch["targets"] != 0
        if config.model == "sasrec":
            return models.sasrec_loss(logits[..., 0], logits[..., 1], mask)
        if config.model == "stosa":
            pvn = cast(jax.Array, model.apply(variables, batch["targets"], batch["negatives"],
                                              method="item_scores"))
            return models.stosa_loss(logits[..., 0], logits[..., 1], pvn, mask,
                                     required(config.pvn_weight, "pvn_weight"))
        return models.bpr_loss(logits[..., 0], logits[..., 1], mask)

    return loss_fn


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    shardings: sharding_lib.StepShardings | None = None) -> Callable:
    """``(params, opt_state, batch, key) -> (params, opt_state, loss)``, jit-compiled.

    ``shardings`` (``MeshPlan.step_shardings``) pins the step's layout on a mesh."""

    def train_step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if shardings is None:
        return jax.jit(train_step, donate_argnums=(0, 1))
    s = shardings
    return jax.jit(train_step, donate_argnums=(0, 1),
                   in_shardings=(s.params, s.opt_state, s.batch, s.replicated),
                   out_shardings=(s.params, s.opt_state, s.replicated))


def make_scorer(config: TrainConfig, model: nn.Module, mesh: Mesh | None = None,
                num_items: int | None = None) -> Callable:
    """``(params, inputs, targets, seen) -> per-example metrics`` over the full catalogue; NaN
    for a row where a candidate's score is NaN or inf.

    ``seen`` (B, K) holds the item ids to exclude per example, padded with 0 (padding, never
    ranked anyway); the (B, catalogue) mask is built on the device from it. Ids past
    ``num_items`` (a mesh's padding rows) are excluded too. With a ``mesh`` the per-example
    metrics come back replicated."""

    def score(params, inputs, targets, seen):
        variables = {"params": params}
        if config.model == "mfbpr":
            user = model.apply(variables, inputs)
        else:
            user = cast(jax.Array, model.apply(variables, inputs, deterministic=True))
            if config.model in SEQUENCE_MODELS:
                user = user[:, -1]
        scores = cast(jax.Array, model.apply(variables, user, method="score_all"))
        exclude = jnp.zeros(scores.shape, bool).at[jnp.arange(seen.shape[0])[:, None],
                                                   seen].set(True)
        if num_items is not None and scores.shape[-1] > num_items + 1:
            exclude = exclude | (jnp.arange(scores.shape[-1]) > num_items)[None, :]
        metrics = metrics_lib.ranking_metrics(metrics_lib.target_ranks(scores, targets, exclude))
        # a NaN or inf candidate score (parameters that overflowed) makes the row's metrics NaN,
        # not the pessimistic rank target_ranks gives it, so that evaluate reports it
        overflowed = jnp.any(~jnp.isfinite(scores) & ~exclude, axis=-1)
        return {k: jnp.where(overflowed, jnp.nan, v) for k, v in metrics.items()}

    if mesh is None:
        return jax.jit(score)
    return jax.jit(score, out_shardings=NamedSharding(mesh, PartitionSpec()))


def padded_rows(csr: sp.csr_matrix, rows: np.ndarray, min_width: int = 8,
                width: int | None = None) -> np.ndarray:
    """The column ids of ``csr``'s ``rows`` as a (len(rows), K) int32 array padded with 0.

    K is ``width`` if given (it must hold the longest row), else the power of two
    (>= ``min_width``) that holds the longest of these rows, so that jit sees few shapes."""
    starts, counts = csr.indptr[rows], np.diff(csr.indptr)[rows]
    longest = int(counts.max(initial=0))
    if width is None:
        width = _power_of_two_at_least(longest, min_width)
    elif longest > width:
        raise ValueError(f"padded_rows: a row holds {longest} ids, more than width {width}")
    cols = np.arange(width)
    valid = cols[None, :] < counts[:, None]
    out = np.zeros((rows.size, width), np.int32)
    out[valid] = csr.indices[(starts[:, None] + cols[None, :])[valid]]
    return out


def exclusion_width(ds: data_lib.SequenceDataset) -> int:
    """The width of the seen-items list (``padded_rows``) of every evaluation batch of ``ds``,
    both splits: the longest training history plus the validation item, rounded up to a power
    of two >= 8. One width per data set, so a run compiles its scorer once.

    Examples:
      >>> exclusion_width(data_lib.synthetic(num_users=20, num_items=30, seq_len=(5, 14)))
      16
    """
    return _power_of_two_at_least(int(ds.train_lengths().max(initial=0)) + 1, 8)


def evaluate(config: TrainConfig, scorer: Callable, params: Any, ds: data_lib.SequenceDataset,
             split: str, plan: sharding_lib.MeshPlan | None = None) -> dict[str, float]:
    """Full-ranking HR@k / NDCG@k of ``split`` over all users; earlier items are masked.

    Every batch has the same shapes: ``min(eval_batch_size, num_users)`` rows (the last batch
    is filled up with user 0, whose rows are dropped from the means) and seen-items lists of
    ``exclusion_width(ds)`` ids, so ``scorer`` compiles once for both splits of a run.
    With a ``plan`` the catalogue has padding ids past ``num_items``; the scorer masks them
    (``make_scorer(..., num_items=)``)."""
    inputs = eval_inputs(config, ds, split)
    targets = (ds.valid if split == "valid" else ds.test).astype(np.int32)
    seen = ds.seen_items(split)
    width = exclusion_width(ds)
    acc = metrics_lib.MetricAccumulator()
    bs = min(config.eval_batch_size, ds.num_users)
    for start in range(0, ds.num_users, bs):
        rows = np.arange(start, min(start + bs, ds.num_users))
        batch_rows = np.concatenate([rows, np.zeros(bs - rows.size, rows.dtype)])
        batch = (inputs[batch_rows], targets[batch_rows], padded_rows(seen, batch_rows,
                                                                       width=width))
        if plan is not None:
            batch = plan.put(batch, plan.replicated)
        acc.update(scorer(params, *batch), mask=np.arange(bs) < rows.size)
    metrics = acc.compute()
    if not all(np.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"the {split} scores are NaN or inf (the parameters "
                                 f"overflowed); lower {_learning_rate_flags(config)} or check "
                                 "the data")
    return metrics


def _learning_rate_flags(config: TrainConfig) -> str:
    """The flags that set the learning rate, for a message about a run that diverged."""
    return "--lr" + (" or --lr-decay-factor" if config.lr_decay_factor > 1 else "")


# ---- progress ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Progress:
    """A run's progress; each checkpoint's metadata holds it (``sevo_jax.checkpoint``)."""

    epoch: int = 0                       # epochs completed
    best_epoch: int = 0
    best_score: float = -1.0
    best_valid: dict | None = None
    evals_since_best: int = 0

    def stopped(self, patience: int | None) -> bool:
        """Early stopping: ``patience`` evaluations without a better score (None: never)."""
        return patience is not None and self.evals_since_best >= patience


def _write_atomic(path: Path, blob: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def has_checkpoint(out: str | os.PathLike) -> bool:
    """Whether the run folder ``out`` holds a committed checkpoint step that
    ``fit(..., resume=True)`` reads (``out/checkpoints/``, ``sevo_jax.checkpoint``)."""
    return bool(checkpoint_lib.committed_epochs(Path(out) / CHECKPOINT_DIR))


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed by this run's config (see :func:`resume_conflicts`)."""


# Fields a resumed run may change: where it writes, how it shows progress and batches the
# evaluation, where it caches (data and compiled programs), its device mesh (checkpoints restore
# onto any mesh) and when it stops (``epochs``: never below the epochs done).
# ``data`` is compared by the data's content fingerprint, not by how the path is spelled.
RESUME_HARMLESS = frozenset({"out", "progress", "eval_batch_size", "cache_dir", "patience",
                             "epochs", "data", "mesh", "compile_cache", "pack_rows"})
DATA_FINGERPRINT = "data_fingerprint"  # the key a checkpoint's metadata stores it under
GRAPH_FINGERPRINT = "graph_fingerprint"  # likewise, of the SEvo graph (None without SEvo)


def resume_conflicts(saved_config: dict, new_config: dict,
                     epochs_done: int | None = None) -> list[str]:
    """Why a run with ``new_config`` cannot resume a checkpoint saved with ``saved_config``.

    Both are ``dataclasses.asdict(TrainConfig)`` dicts, optionally with ``DATA_FINGERPRINT``
    (``SequenceDataset.fingerprint()``). Returns one short phrase per conflict (empty: it may
    resume). A field missing from an older checkpoint counts as the value the code that wrote
    it used: ``dropout_bits`` 32 for SASRec, BERT4Rec and STOSA, else the ``TrainConfig``
    default; fields the model does not read (``MODEL_SPECIFIC_FIELDS``) never conflict. A
    ``length_bucket`` of ``maxlen`` or more equals None (no batch is trimmed).
    Fields in ``RESUME_HARMLESS`` may differ, except ``epochs`` below ``epochs_done`` (the
    recorded config would then disagree with the epochs run) and a changed data content.
    """
    defaults = dataclasses.asdict(TrainConfig())
    if saved_config.get("model") in SEQUENCE_MODELS:  # written before 16-bit dropout masks
        defaults["dropout_bits"] = 32
    saved = defaults | saved_config
    new_config = dict(new_config)
    for name in unread_fields(saved.get("model")):  # older runs hold defaults there
        saved.pop(name, None)
        new_config.pop(name, None)
    for config in (saved, new_config):  # a bucket of maxlen or more never trims: same as None
        bucket, maxlen = config.get("length_bucket"), config.get("maxlen")
        if bucket is not None and maxlen is not None and bucket >= maxlen:
            config["length_bucket"] = None
    conflicts = [f"{k} is {saved.get(k)!r} in the checkpoint, {new_config.get(k)!r} now"
                 for k in sorted(saved.keys() | new_config.keys())
                 if k not in RESUME_HARMLESS and k != DATA_FINGERPRINT
                 and saved.get(k) != new_config.get(k)]
    old_print, new_print = saved.get(DATA_FINGERPRINT), new_config.get(DATA_FINGERPRINT)
    if old_print is not None and new_print is not None:
        if old_print != new_print:
            conflicts.append(f"the data {new_config.get('data') or '(synthetic)'} changed since "
                             f"the checkpoint (content fingerprint {old_print} then, "
                             f"{new_print} now)")
    elif not _same_path(saved.get("data"), new_config.get("data")):
        conflicts.append(f"data is {saved.get('data')!r} in the checkpoint, "
                         f"{new_config.get('data')!r} now")
    epochs = new_config.get("epochs")
    if epochs_done is not None and epochs is not None and epochs < epochs_done:
        conflicts.append(f"epochs {epochs} is fewer than the {epochs_done} the checkpoint has "
                         f"trained (pass epochs >= {epochs_done})")
    return conflicts


def _same_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    return a == b or Path(a).resolve() == Path(b).resolve()


# ---- the loop ------------------------------------------------------------------------------------


def _epoch_of(line: str) -> int | None:
    """The epoch of a metrics-log line, or None if it is not a complete record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    epoch: Any = record.get("epoch") if isinstance(record, dict) else None
    return epoch if _is_int(epoch) and epoch >= 1 else None


def _complete_lines(path: Path) -> tuple[list[str], str | None]:
    """The records of a metrics log and the cut-short last line dropped (None if none).

    Only a last line without its line break (a run killed mid-write) may be dropped; any
    other line that is not a record is an error naming it, so nothing written is lost.
    """
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    cut = None
    if lines and not text.endswith("\n") and _epoch_of(lines[-1]) is None:
        cut = lines.pop()
    for k, line in enumerate(lines, 1):
        if _epoch_of(line) is None:
            snippet = repr(line if len(line) <= 60 else line[:57] + "...")
            raise ValueError(f"{path}:{k}: found {snippet}, expected a JSON record with an "
                             "'epoch'; repair or delete that line, then resume")
    return lines, cut


# What a run writes to its folder; a folder holding any of them is in use (see ``fit``).
CHECKPOINT_DIR = "checkpoints"
PREVIOUS_RESULTS = "results.previous.json"  # a finished run's record when it trains on
RUN_FILES = ("metrics.jsonl", "results.json", CHECKPOINT_DIR, "checkpoint.msgpack",
             "checkpoint.json", PREVIOUS_RESULTS)
LOCK_FILE = ".sevo-train.lock"
REPLACED_DIR = ".sevo-train.replaced"  # --overwrite: the previous run, until the new one writes
_DELETING_DIR = ".sevo-train.deleting"


def _numbered_previous_results(n: int | str) -> str:
    """The name of the ``n``-th kept record, ``results.previous.N.json`` (``"*"``: a glob)."""
    return PREVIOUS_RESULTS.replace(".json", f".{n}.json")


def _free_previous_results_name(out: Path) -> str:
    """``PREVIOUS_RESULTS``, or ``results.previous.N.json`` (N = 2, 3, ...) once taken: every
    record a run finished with before training on is kept."""
    name, n = PREVIOUS_RESULTS, 1
    while (out / name).exists():
        n += 1
        name = _numbered_previous_results(n)
    return name


def _restore_replaced(out: Path, log: Callable[[str], None]) -> None:
    """Move a previous run set aside by ``--overwrite`` back into ``out`` (the run that set it
    aside failed, or was killed, before its first checkpoint), and finish an interrupted
    delete. Files of the same names in ``out`` are that unfinished run's: they are deleted."""
    shutil.rmtree(out / _DELETING_DIR, ignore_errors=True)
    aside = out / REPLACED_DIR
    if not aside.is_dir():
        return
    back = [p.name for p in sorted(aside.iterdir())]
    dropped = [name for name in back if (out / name).exists()]
    for name in back:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        elif (out / name).exists():
            (out / name).unlink()
        (aside / name).rename(out / name)
    aside.rmdir()
    if back:
        unfinished = (f" (deleted the unfinished replacing run's {', '.join(dropped)})"
                      if dropped else "")
        log(f"overwrite: put the previous run's {', '.join(back)} back in {out}{unfinished}")


@contextlib.contextmanager
def _claim_run_folder(out: Path, *, resume: bool, overwrite: bool, log: Callable[[str], None]):
    """Hold ``out`` for one run: lock it, and refuse a folder that another live run holds,
    that already holds a run (without ``resume`` or ``overwrite``) or, with ``resume``, that
    holds no checkpoint. ``overwrite`` moves the previous run's ``RUN_FILES`` to
    ``REPLACED_DIR``; the context yields ``replace_previous()``, which deletes them and which the
    run calls once its first checkpoint is committed. A run that fails (or is killed) before
    that gets them back, in place of what it wrote, so a command that fails on its data, its
    settings or in its first epochs loses nothing.

    The lock is ``flock`` on ``out/LOCK_FILE``: the OS releases it when the process dies,
    so a crashed run never leaves the folder locked. A run that fails before writing anything
    removes the folder, and the parent folders, that it created.
    """
    made = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    created = bool(made)

    def remove_made_parents() -> None:  # only those still empty
        for folder in made[1:]:
            with contextlib.suppress(OSError):
                folder.rmdir()

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a file in the way, no permission, a read-only disk
        if created:  # the folders made just now, if any, hold nothing: leave no trace
            with contextlib.suppress(OSError):
                out.rmdir()
            remove_made_parents()
        what = "is a file, not a folder" if out.is_file() else f"cannot be written ({e.strerror})"
        raise ConfigError("out", f"{out} {what}; choose another run folder") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                raise ValueError(f"{out} is in use by another run (pid {holder}); wait for it "
                                 "to finish or choose another --out") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        _restore_replaced(out, log)
        # an empty folder (a run that failed before its first checkpoint) is not a run
        found = [name for name in RUN_FILES if (out / name).exists() and not (
            (out / name).is_dir() and not any((out / name).iterdir()))]
        found += sorted(p.name for p in out.glob(_numbered_previous_results("*")))
        legacy = out / "checkpoint.msgpack"
        if resume and not has_checkpoint(out) and legacy.exists():
            raise ValueError(f"{legacy} was written by a sevo_jax before Orbax checkpoints and "
                             "cannot be resumed; rerun with --overwrite or in a new --out")
        if resume and not has_checkpoint(out):
            held = f" (it holds {', '.join(found)}; --overwrite starts again)" if found else ""
            raise ValueError(f"cannot resume: {out} holds no checkpoint{held}")
        if found and not resume:
            if not overwrite:
                raise ValueError(f"{out} already holds a run ({', '.join(found)}); pass --resume "
                                 "to continue it or --overwrite to replace it")
            (out / REPLACED_DIR).mkdir()
            for name in found:
                (out / name).rename(out / REPLACED_DIR / name)

        def replace_previous() -> None:
            if (out / REPLACED_DIR).is_dir():  # renamed first: a killed delete is finished later
                (out / REPLACED_DIR).rename(out / _DELETING_DIR)
                shutil.rmtree(out / _DELETING_DIR)
                log(f"overwrite: deleted {', '.join(found)} of the previous run from {out}")

        yield replace_previous
    except BaseException:
        _restore_replaced(out, log)
        if created:
            with contextlib.suppress(OSError):
                (out / CHECKPOINT_DIR).rmdir()  # only if empty: no step was written
            if os.listdir(out) == [LOCK_FILE]:  # still locked: no other run is in it
                with contextlib.suppress(OSError):
                    (out / LOCK_FILE).unlink()
                    out.rmdir()
                    remove_made_parents()
        raise
    finally:  # otherwise the lock file stays: deleting it could let two runs lock two files
        os.close(fd)


def _device_copy(tree: Any) -> Any:
    """A copy of a pytree of device arrays, same shardings (the train step donates its input)."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def fit(config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
        dataset: data_lib.SequenceDataset | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Train, validate every ``eval_every`` epochs, stop early on validation NDCG@10, and test
    the best parameters. Writes ``metrics.jsonl``, ``checkpoints/`` (``sevo_jax.checkpoint``:
    one atomic step per evaluation, the latest and the best kept) and ``results.json`` to
    ``config.out`` and returns the results dict.

    ``config.out`` is locked for the run. A folder that already holds a run is refused unless
    ``resume`` (continue it: it must hold a checkpoint) or ``overwrite`` (replace it: the old
    run is deleted once the new one has committed its first checkpoint, and put back if it
    fails or is killed first).
    ``config.compile_cache`` turns on JAX's persistent compilation cache for the process
    (``enable_compile_cache``).
    """
    config = config.resolved()
    config.validate()
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in --out, "
                         "or replace it")
    plan = mesh_plan(config)  # a bad --mesh fails here, before any data is read
    out = Path(config.out)

    def run(replace_previous: Callable[[], None]) -> dict:
        opened: list[checkpoint_lib.RunCheckpoints] = []
        try:
            return _fit_in_folder(config, plan, out, resume, dataset, log, replace_previous,
                                  opened)
        except BaseException:  # Orbax's threads end before the folder is tidied or Python ends
            for checkpoints in opened:
                with contextlib.suppress(Exception):
                    checkpoints.close()
            raise

    if plan is not None and jax.process_index() != 0:  # several hosts: process 0 holds out
        return run(lambda: None)
    with _claim_run_folder(out, resume=resume, overwrite=overwrite, log=log) as replace_previous:
        return run(replace_previous)


def _fit_in_folder(config: TrainConfig, plan: sharding_lib.MeshPlan | None, out: Path,
                   resume: bool, dataset: data_lib.SequenceDataset | None,
                   log: Callable[[str], None], replace_previous: Callable[[], None],
                   opened: list[checkpoint_lib.RunCheckpoints]) -> dict:
    """``fit`` once ``out`` is claimed; ``replace_previous()`` runs after the first checkpoint. The
    run's checkpoints are appended to ``opened`` (``fit`` closes them if the run fails)."""
    if config.compile_cache:
        enable_compile_cache(log=log)
    epochs = required(config.epochs, "epochs")
    batch_size = required(config.batch_size, "batch_size")
    ds = dataset if dataset is not None else data_lib.load_dataset(
        config.format, config.data, cache_dir=config.cache_dir, kcore=config.kcore,
        keep_duplicates=config.keep_duplicates)
    cfg_dict = dataclasses.asdict(config)
    data_fingerprint = ds.fingerprint()
    ckpt_config = cfg_dict | {DATA_FINGERPRINT: data_fingerprint}
    stats = ds.stats()
    log(f"data {ds.name}: {stats['users']} users, {stats['items']} items, "
        f"{stats['interactions']} interactions; dropped {stats['duplicates_dropped']} duplicate "
        f"rows and {stats['users_dropped']} users with too few interactions")

    examples = training_examples(config, ds)
    if not examples.has_targets():
        raise data_lib.DataError(
            f"{config.data or ds.name}: no training example for {config.model}: no user has 2 "
            "training items (4 interactions: 2 to train on, a validation and a test item)")
    adjacency = build_graph(config, ds) if config.optimizer.startswith("sevo") else None
    model, optimizer, params, opt_state = init_training(config, ds, plan, adjacency)
    sampler = NegativeSampler(ds)
    best_params = _device_copy(params)
    progress = Progress()
    shardings = None if plan is None else plan.step_shardings(params, opt_state, optimizer)
    writer = plan is None or jax.process_index() == 0  # several hosts: process 0 writes

    checkpoints = checkpoint_lib.RunCheckpoints(out / CHECKPOINT_DIR)
    opened.append(checkpoints)
    run_meta = {"config": cfg_dict, DATA_FINGERPRINT: data_fingerprint,
                GRAPH_FINGERPRINT: None if adjacency is None
                else checkpoint_lib.graph_fingerprint(adjacency)}
    log_path = out / "metrics.jsonl"
    if resume:
        epoch = checkpoints.latest_epoch()
        if epoch is None:
            raise ResumeError(f"cannot resume: {checkpoints.directory} holds no checkpoint")
        meta = checkpoints.read_meta(epoch)
        saved = meta.get("config", {}) | {DATA_FINGERPRINT: meta.get(DATA_FINGERPRINT)}
        conflicts = resume_conflicts(saved, ckpt_config, meta.get("progress", {}).get("epoch"))
        if meta.get(GRAPH_FINGERPRINT) != run_meta[GRAPH_FINGERPRINT]:
            conflicts.append("the SEvo graph differs from the one it was trained on "
                             f"({GRAPH_FINGERPRINT} {str(meta.get(GRAPH_FINGERPRINT))[:12]} in "
                             f"the checkpoint, {str(run_meta[GRAPH_FINGERPRINT])[:12]} now)")
        if conflicts:
            raise ResumeError(f"cannot resume {checkpoints.step_path(epoch)}: "
                              f"{'; '.join(conflicts)}")
        template = {"params": params, "opt_state": opt_state, "best_params": params}
        state, meta = checkpoints.restore(template, epoch)
        params, opt_state, best_params = state["params"], state["opt_state"], state["best_params"]
        progress = Progress(**meta["progress"])
        lines, cut = _complete_lines(log_path)
        kept = [line for line in lines  # all records (_complete_lines), so never None
                if (e := _epoch_of(line)) is not None and e <= progress.epoch]
        if writer:
            _write_atomic(log_path, "".join(line + "\n" for line in kept).encode())
        notes = [f"resumed from {checkpoints.step_path(epoch)} after epoch {progress.epoch}"]
        if cut is not None:
            notes.append(f"dropped the cut-short last line of {log_path}: {cut[:60]!r}")
        if len(kept) < len(lines):
            notes.append(f"dropped {len(lines) - len(kept)} line(s) of {log_path} after the "
                         "checkpoint's epoch (trained again)")
        if saved.get("epochs") not in (None, config.epochs):
            notes.append(f"training to epoch {config.epochs} (the run was started for "
                         f"{saved['epochs']})")
        finished = out / "results.json"
        if writer and finished.exists() and progress.epoch < epochs and not progress.stopped(
                config.patience):
            # the run trains on: its old record no longer describes it (kept beside, renamed)
            kept_as = _free_previous_results_name(out)
            finished.replace(out / kept_as)
            notes.append(f"moved the finished run's results.json to {kept_as}")
        if bool(saved.get("pack_rows")) != bool(config.pack_rows):
            notes.append(f"pack_rows is {config.pack_rows} now, {saved.get('pack_rows')} for "
                         "the checkpoint's epochs (the same loss, other batch layouts and "
                         "dropout draws; metrics.jsonl's batch_rows marks packed epochs)")
        log("; ".join(notes))

    train_step = make_train_step(make_loss_fn(config, model), optimizer, shardings)
    scorer = make_scorer(config, model, None if plan is None else plan.mesh, ds.num_items)
    base_key = jax.random.PRNGKey(config.seed)
    bar = _progress_bar(config, progress.epoch)
    stopped = progress.stopped(config.patience)
    for epoch in range(progress.epoch + 1, epochs + 1):
        if stopped:
            break
        t0 = time.perf_counter()
        rng = np.random.default_rng([config.seed, epoch])
        epoch_key = jax.random.fold_in(base_key, epoch)
        if plan is not None:
            epoch_key = plan.put(epoch_key, plan.replicated)
        losses, rows = [], []
        for step, batch in enumerate(examples.epoch_batches(sampler, batch_size, rng)):
            rows.append(len(next(iter(batch.values()))))
            if plan is not None:
                batch = plan.put(batch, plan.batch)
            params, opt_state, loss = train_step(params, opt_state, batch,
                                                 jax.random.fold_in(epoch_key, step))
            losses.append(loss)
        record: dict[str, Any] = {"epoch": epoch, "loss": float(np.mean(jax.device_get(losses))),
                  "train_seconds": round(time.perf_counter() - t0, 3)}
        if examples.pack_rows:
            record["batch_rows"] = round(float(np.mean(rows)), 2)  # packed rows per batch
        if not np.isfinite(record["loss"]):
            raise FloatingPointError(f"training loss became {record['loss']} at epoch {epoch}; "
                                     f"lower {_learning_rate_flags(config)} or check the data")
        progress.epoch = epoch
        if epoch % config.eval_every == 0 or epoch == epochs:
            valid = evaluate(config, scorer, params, ds, "valid", plan)
            record["valid"] = valid
            if valid["NDCG@10"] > progress.best_score:
                progress.best_score, progress.best_epoch = valid["NDCG@10"], epoch
                progress.best_valid = valid
                progress.evals_since_best = 0
                best_params = _device_copy(params)
            else:
                progress.evals_since_best += 1
            stopped = progress.stopped(config.patience)
        # the log line before the checkpoint: a run killed between the two resumes from the
        # previous checkpoint and drops the log lines after it
        if writer:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if "valid" in record:
            checkpoints.save(epoch, {"params": params, "opt_state": opt_state,
                                     "best_params": best_params},
                             {**run_meta, "progress": dataclasses.asdict(progress),
                              "rng": {"seed": config.seed, "next_epoch": epoch + 1}},
                             score=valid["NDCG@10"])
            replace_previous()  # the new run has a checkpoint: the overwritten one may go
        bar.update(record, progress)
    bar.close()
    checkpoints.close()

    test = evaluate(config, scorer, best_params, ds, "test", plan)
    results = {"valid": progress.best_valid, "test": test, "best_epoch": progress.best_epoch,
               "epochs_run": progress.epoch, "config": cfg_dict,
               "data": stats | {"fingerprint": data_fingerprint}}
    if writer:
        _write_atomic(out / "results.json", json.dumps(results, indent=2).encode())
    return results


class _progress_bar:
    """tqdm over epochs showing loss and the last validation NDCG@10 (silent if disabled)."""

    def __init__(self, config: TrainConfig, done: int):
        self.bar = None
        if config.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=config.epochs, initial=done,
                            desc=f"{config.model}/{config.optimizer}",
                            unit="epoch", dynamic_ncols=True)

    def update(self, record: dict, progress: Progress) -> None:
        if self.bar is not None:
            post = {"loss": f"{record['loss']:.4f}"}
            if progress.best_valid is not None:
                ndcg = record.get("valid", {}).get("NDCG@10", progress.best_score)
                post["ndcg@10"] = f"{ndcg:.4f}"
            self.bar.set_postfix(post)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
