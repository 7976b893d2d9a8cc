"""A training run's checkpoints: one atomic Orbax step per evaluation; latest and best kept.

``RunCheckpoints(out / "checkpoints")`` wraps an ``orbax.checkpoint.CheckpointManager`` whose step
``e`` is the state after epoch ``e``. One step holds, written together and committed by one
rename (Orbax writes into ``<e>.orbax-checkpoint-tmp`` and renames it when complete, so a step
either exists whole or not at all):

* ``state`` (``StandardSave``): ``params``, ``opt_state`` and ``best_params`` as they live on the
  devices; on a mesh each process writes the shards it holds (nothing is gathered to a host);
* ``meta`` (JSON): the progress (epoch, best epoch / score / validation metrics, evaluations
  since the best), the RNG and data-order state (everything random derives from the seed and
  the epoch: see ``sevo_jax.training``), the run's config and the fingerprints of its data and
  of its normalised graph.

Integrity: before the commit the primary process records the size and CRC-32 of every file of
the step (``meta/files.json``); a restore checks them first, so a damaged or cut-short
checkpoint is refused with one line naming it and the file, never read as other numbers.
Whether a run may resume a step (same config, data and graph) is decided by the trainer from
``read_meta`` (``sevo_jax.training.resume_conflicts``) before ``restore``.

The graph is not stored: ``without_graphs`` puts ``None`` in place of every graph operator in
the optimizer state, and ``restore`` takes the graph from the freshly built optimizer state
(the template); the metadata holds its ``graph_fingerprint`` so the trainer can refuse another
graph.

Restoring reads every array straight into the template's shardings, so a checkpoint written
under ``--mesh data=8`` restores under ``--mesh data=4`` or unsharded. Sharded runs pad the
row-sharded tables (and their optimizer state) with zero rows up to a multiple of the mesh
size; such a table (an array of two or more dimensions) is read into the template's row count,
dropping or appending padding rows (Orbax's ``strict=False``; padding rows stay exactly zero in
training, see ``sevo_jax.training``); any other difference of shape, and any difference of
dtype, is refused.

Fault injection: ``fault_hook(stage, epoch)`` (module attribute) and the environment variable
``SEVO_JAX_CHECKPOINT_FAULT=STAGE@EPOCH[,STAGE@EPOCH...]`` (which SIGKILLs the process there)
are invoked at the stages ``FAULT_STAGES`` of saving epoch ``EPOCH``'s checkpoint:
``before-save`` (nothing written yet), ``before-commit`` (every file written into the
temporary step directory, which is not yet renamed) and ``after-commit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import scipy.sparse as sp

from sevo_jax.operator import GraphOperator, normalized_scipy

__all__ = [
    "FAULT_ENV",
    "FAULT_STAGES",
    "RunCheckpoints",
    "committed_epochs",
    "graph_fingerprint",
    "is_graph",
    "verify_manifest",
    "with_graphs",
    "without_graphs",
    "write_manifest",
]

FORMAT_VERSION = 1
FAULT_ENV = "SEVO_JAX_CHECKPOINT_FAULT"
FAULT_STAGES = ("before-save", "before-commit", "after-commit")

fault_hook: Callable[[str, int], None] | None = None


def committed_epochs(directory: str | os.PathLike) -> list[int]:
    """The epochs of the committed steps in ``directory`` (a step in the middle of its write
    still has Orbax's temporary name and is not counted), without opening a manager."""
    path = Path(directory)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


# ---- graphs in the optimizer state ---------------------------------------------------------------


def is_graph(x: Any) -> bool:
    """Whether ``x`` is a graph operator carried in an optimizer state (rebuilt, never stored)."""
    return isinstance(x, GraphOperator)


def without_graphs(tree: Any) -> Any:
    """``tree`` with every graph operator replaced by ``None`` (an empty subtree)."""
    return jax.tree_util.tree_map(lambda x: None if is_graph(x) else x, tree, is_leaf=is_graph)


def with_graphs(tree: Any, template: Any) -> Any:
    """Put ``template``'s graph operators back where ``without_graphs`` left ``None``."""
    return jax.tree_util.tree_map(lambda t, x: t if is_graph(t) else x, template, tree,
                                  is_leaf=is_graph)


def graph_fingerprint(adjacency: Any) -> str:
    """SHA-256 of the normalised graph ``Ã`` (shape, then CSR indices and float32 weights),
    computed on the host from the RAW ``adjacency`` before any mesh padding, so it does not
    depend on the mesh."""
    csr = sp.csr_matrix(normalized_scipy(adjacency))
    csr.sum_duplicates()
    csr.sort_indices()
    h = hashlib.sha256(np.asarray(csr.shape, np.int64).tobytes())
    for part in (csr.indptr.astype(np.int64), csr.indices.astype(np.int64),
                 csr.data.astype(np.float32)):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


# ---- fault injection -----------------------------------------------------------------------------


def _parse_faults(value: str) -> set[tuple[str, int]]:
    faults = set()
    for part in filter(None, (p.strip() for p in value.split(","))):
        stage, _, epoch = part.partition("@")
        if stage not in FAULT_STAGES or not epoch.isdigit():
            raise ValueError(f"{FAULT_ENV}={value!r}: expected STAGE@EPOCH[,STAGE@EPOCH...] with "
                             f"STAGE one of {', '.join(FAULT_STAGES)}, got {part!r}")
        faults.add((stage, int(epoch)))
    return faults


def _fault_point(stage: str, epoch: int) -> None:
    if fault_hook is not None:
        fault_hook(stage, epoch)
    if (stage, epoch) in _parse_faults(os.environ.get(FAULT_ENV, "")):
        os.kill(os.getpid(), signal.SIGKILL)


# ---- integrity -----------------------------------------------------------------------------------

MANIFEST = "files.json"  # in the meta item: size and CRC-32 of every file of the step
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_UNLISTED = {"_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST}  # rewritten at the commit


@contextlib.contextmanager
def _interrupt_held():
    """Hold a SIGINT that arrives inside the block and raise it (``KeyboardInterrupt``) after.

    A KeyboardInterrupt inside Orbax's save closed its event loop under its writer threads,
    which then printed hundreds of lines of tracebacks. Only the main thread can set signal
    handlers; elsewhere, or under another handler than Python's default, nothing changes.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _step_files(step_dir: Path) -> dict[str, Path]:
    """The step's files by their path relative to the step once committed."""
    files = {}
    for path in sorted(step_dir.rglob("*")):
        if path.is_file() and path.name not in _UNLISTED:
            rel = "/".join(part.split(_TMP_SUFFIX)[0] for part in path.relative_to(step_dir).parts)
            files[rel] = path
    return files


def write_manifest(step_dir: Path, manifest_path: Path) -> None:
    """Record the size and CRC-32 of every file of ``step_dir`` in ``manifest_path``."""
    files = {rel: [path.stat().st_size, _crc32(path)]
             for rel, path in _step_files(step_dir).items()}
    manifest_path.write_text(json.dumps(files, sort_keys=True))


def verify_manifest(step_dir: Path) -> None:
    """ValueError naming ``step_dir`` and the first file missing, cut short or changed since
    the step was written (tensorstore would read changed array bytes silently)."""
    manifest_path = step_dir / "meta" / MANIFEST
    try:
        expected = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {step_dir} is corrupt: its file list {manifest_path} is "
                         f"missing or unreadable ({_one_line(e)})") from e
    for rel, (size, crc) in sorted(expected.items()):
        path = step_dir / rel
        if not path.is_file():
            raise ValueError(f"checkpoint {step_dir} is corrupt: {rel} is missing")
        found = path.stat().st_size
        if found != size:
            raise ValueError(f"checkpoint {step_dir} is corrupt: {rel} has {found} bytes, "
                             f"{size} were written")
        if _crc32(path) != crc:
            raise ValueError(f"checkpoint {step_dir} is corrupt: {rel} has changed since it "
                             f"was written (CRC-32 mismatch)")


class _MetaHandler(ocp.JsonCheckpointHandler):
    """The JSON item; its ``finalize`` runs on the primary process after every process wrote its
    files and after the ``state`` item was finalized, just before the step is committed."""

    def __init__(self):
        super().__init__()
        self.saving_epoch = -1

    def finalize(self, directory) -> None:
        super().finalize(directory)
        directory = Path(directory)
        write_manifest(directory.parent, directory / MANIFEST)
        _fault_point("before-commit", self.saving_epoch)


@ocp.args.register_with_handler(_MetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.JsonSave):
    pass


@ocp.args.register_with_handler(_MetaHandler, for_restore=True)
@dataclasses.dataclass
class _MetaRestore(ocp.args.JsonRestore):
    pass


# ---- the run's checkpoints -----------------------------------------------------------------------


def _leaf_name(path: tuple) -> str:
    """A key path as Orbax names the leaf (``opt_state.0.mu.item_embedding.embedding``)."""
    def part(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)
    return ".".join(part(k) for k in path)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class RunCheckpoints:
    """A run's Orbax checkpoints in ``directory``: step ``e`` after epoch ``e``; every step but
    the latest and the best (highest validation NDCG@10, the earliest on ties) is deleted once
    a newer step is committed.

    ``save(epoch, state, meta, score)`` writes ``state`` (a pytree of device arrays, e.g.
    ``{"params", "opt_state", "best_params"}``; graph operators are left out) and the JSON
    ``meta`` as one step. ``restore(template)`` reads the latest step into ``template``'s
    shapes and shardings.
    Every process of a multi-host run calls both (Orbax coordinates them)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).absolute()
        _parse_faults(os.environ.get(FAULT_ENV, ""))  # a malformed value fails before training
        self._meta_handler = _MetaHandler()
        self._verified: set[int] = set()  # steps whose files were checked by read_meta
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(1),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: (m["NDCG@10"], -m["epoch"]), n=1,
                keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
            # Orbax writes a step's metrics to disk only with a best_fn; without them a
            # reopened run's best step counts as "without metrics" and is deleted
            best_fn=lambda m: m["NDCG@10"])
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": self._meta_handler})

    def latest_epoch(self) -> int | None:
        """The epoch of the newest committed step (None: no checkpoint)."""
        return self.manager.latest_step()

    def all_epochs(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_path(self, epoch: int) -> Path:
        return self.directory / str(epoch)

    def clear(self) -> None:
        """Delete every step (a run that starts over in the same folder)."""
        for epoch in self.manager.all_steps():
            self.manager.delete(epoch)

    def save(self, epoch: int, state: Any, meta: dict, score: float) -> None:
        """Write ``state`` and ``meta`` as step ``epoch``; ``score`` ranks it for "best". A
        Ctrl-C (SIGINT) during the save is held until the step is committed, then raised."""
        _fault_point("before-save", epoch)
        self._meta_handler.saving_epoch = epoch
        meta = {"format": FORMAT_VERSION, "epoch": int(epoch), **meta}
        with _interrupt_held():
            self.manager.save(
                int(epoch),
                args=ocp.args.Composite(state=ocp.args.StandardSave(without_graphs(state)),
                                        meta=_MetaSave(meta)),
                metrics={"NDCG@10": float(score), "epoch": int(epoch)}, force=True)
        _fault_point("after-commit", epoch)

    def read_meta(self, epoch: int) -> dict:
        """Step ``epoch``'s JSON metadata, after checking the step's files against its file
        list (once per step); a ValueError naming the step if corrupt or unreadable."""
        path = self.step_path(epoch)
        if epoch not in self._verified:
            verify_manifest(path)
            self._verified.add(epoch)
        try:
            meta = self.manager.restore(epoch, args=ocp.args.Composite(meta=_MetaRestore()))["meta"]
        except Exception as e:  # Orbax and tensorstore raise many types for a damaged step
            raise ValueError(f"checkpoint {path} is unreadable: {_one_line(e)}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"checkpoint {path} has no sevo_jax metadata of format "
                             f"{FORMAT_VERSION} (found {str(meta)[:80]!r})")
        return meta

    def restore(self, template: Any, epoch: int | None = None) -> tuple[Any, dict]:
        """``(state, meta)`` of step ``epoch`` (default: the latest), read into ``template``'s
        shapes and shardings; ``template``'s graph operators are kept. Whether the run may
        resume this step (config, data, graph) is the caller's decision, from ``read_meta``."""
        epoch = self.latest_epoch() if epoch is None else epoch
        if epoch is None:
            raise ValueError(f"no checkpoint in {self.directory}")
        if epoch not in self.all_epochs():
            raise ValueError(f"no checkpoint of epoch {epoch} in {self.directory} (it holds "
                             f"epochs {self.all_epochs()})")
        path = self.step_path(epoch)
        meta = self.read_meta(epoch)
        stripped = without_graphs(template)
        self._check_shapes(epoch, stripped)
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), stripped)
        try:
            restored = self.manager.restore(epoch, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract, strict=False)))["state"]
        except Exception as e:  # Orbax and tensorstore raise many types for a damaged step
            raise ValueError(f"checkpoint {path} is unreadable: {_one_line(e)}") from e
        return with_graphs(restored, template), meta

    def _check_shapes(self, epoch: int, target: Any) -> None:
        """The template's arrays match the step's in dtype and shape, except the leading (row)
        dimension of arrays of two or more dimensions: mesh padding rows of a table."""
        path = self.step_path(epoch)
        try:
            saved_tree = self.manager.item_metadata(epoch)["state"].tree
        except AttributeError as e:  # no state item metadata
            raise ValueError(f"checkpoint {path} is corrupt: it has no array metadata") from e
        except Exception as e:
            raise ValueError(f"checkpoint {path} is unreadable: {_one_line(e)}") from e
        saved = {leaf.name: (tuple(leaf.shape), np.dtype(leaf.dtype))
                 for leaf in jax.tree_util.tree_leaves(saved_tree) if hasattr(leaf, "shape")}
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
            name = _leaf_name(key_path)
            if not isinstance(leaf, jax.Array):
                raise TypeError(f"the restore template's {name} is a {type(leaf).__name__}, not a "
                                "jax.Array (restore reads into its shape, dtype and sharding)")
            shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
            if name not in saved:
                raise ValueError(f"checkpoint {path} lacks the array {name} that this run has")
            old, old_dtype = saved[name]
            if old != shape and (len(old) != len(shape) or len(old) < 2 or old[1:] != shape[1:]):
                raise ValueError(f"checkpoint {path}: array {name} has shape {old}, this run "
                                 f"expects {shape}")
            if old_dtype != dtype:
                raise ValueError(f"checkpoint {path}: array {name} is {old_dtype}, this run "
                                 f"expects {dtype}")

    def close(self) -> None:
        self.manager.close()
