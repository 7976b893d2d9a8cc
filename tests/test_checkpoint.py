"""Orbax checkpoints of a run (``sevo_jax.checkpoint``): atomic steps, crash and resume, meshes.

Three kinds of checks:

* in-process ones on small data (graphs left out and put back, fingerprints, keep-latest-and-best,
  refusals, a corrupt step);
* crash tests: ``python -m sevo_jax.train`` SIGKILLed at several moments by the fault-injection
  hook (``SEVO_JAX_CHECKPOINT_FAULT``), including inside the write window of a checkpoint, then
  resumed with ``--resume`` until done: ``results.json`` equals an uninterrupted run's byte for
  byte, for SASRec, GRU4Rec and MF-BPR. The runs share a JAX compilation cache, so only the
  first run of each model compiles (a cached executable computes what a fresh one does);
* mesh checks, in ONE fresh process with 8 fake CPU devices (``check_*``, as in
  tests/test_sharded_training.py): a checkpoint saved under ``data=8`` restores under
  ``data=8``, ``data=4`` and unsharded with the same values and the new run's shardings, and
  the next train step from it equals the next step from the saved values placed directly; and
  a 2-process run (gloo) whose processes each write only their own shards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import helpers

SMALL = dict(maxlen=8, features=16, num_blocks=1, batch_size=64, eval_batch_size=128,
             progress=False)


# --------------------------------------------------------------------------------------------
# In-process checks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ds():
    from sevo_jax import data

    return data.synthetic(num_users=120, num_items=150, num_clusters=6, seq_len=(5, 14), seed=1)


def _fit(tmp_path, ds, name="run", resume=False, **overrides):
    from sevo_jax import training

    fields = {**dict(epochs=3, eval_every=1, seed=3, out=str(tmp_path / name), **SMALL),
              **overrides}
    cfg = training.TrainConfig(**helpers.config_fields(fields.pop("model", "sasrec"), fields))
    return training.fit(cfg, dataset=ds, resume=resume, log=lambda s: None), cfg


def _template(cfg, ds):
    from sevo_jax import training

    cfg = cfg.resolved()
    _, _, params, opt_state = training.init_training(cfg, ds, training.mesh_plan(cfg))
    return {"params": params, "opt_state": opt_state, "best_params": params}


def _expected(cfg, ds):
    import dataclasses

    from sevo_jax import checkpoint, training

    cfg = cfg.resolved()
    return {"config": dataclasses.asdict(cfg),
            training.DATA_FINGERPRINT: ds.fingerprint(),
            training.GRAPH_FINGERPRINT: checkpoint.graph_fingerprint(training.build_graph(cfg, ds))}


def test_graphs_are_left_out_and_put_back(small_ds):
    import jax

    from sevo_jax import checkpoint, training
    from sevo_jax.operator import NormalizedGraph

    cfg = training.TrainConfig(**SMALL).resolved()
    _, _, _, state = training.init_training(cfg, small_ds)
    graphs = [x for x in jax.tree_util.tree_leaves(state, is_leaf=checkpoint.is_graph)
              if checkpoint.is_graph(x)]
    assert len(graphs) == 1 and isinstance(graphs[0], NormalizedGraph)
    stripped = checkpoint.without_graphs(state)
    assert not any(checkpoint.is_graph(x) for x in
                   jax.tree_util.tree_leaves(stripped, is_leaf=checkpoint.is_graph))
    # the stripped state holds every array of the state except the graph's own
    graph_leaves = len(jax.tree_util.tree_leaves(graphs[0]))
    assert graph_leaves == 3  # indices, weights and the cache tag (sevo_jax.operator)
    assert (len(jax.tree_util.tree_leaves(stripped))
            == len(jax.tree_util.tree_leaves(state)) - graph_leaves)
    back = checkpoint.with_graphs(stripped, state)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(state)):
        assert a is b


def test_graph_fingerprint_depends_on_the_graph_only():
    import scipy.sparse as sp

    from sevo_jax import checkpoint

    dense = np.array([[0, 1, 0], [1, 0, 2], [0, 2, 0]], np.float64)
    fp = checkpoint.graph_fingerprint(dense)
    assert fp == checkpoint.graph_fingerprint(sp.coo_matrix(dense))  # representation-free
    assert fp == checkpoint.graph_fingerprint(sp.csr_matrix(2 * dense))  # normalised graph
    other = dense.copy()
    other[0, 2] = other[2, 0] = 1
    assert fp != checkpoint.graph_fingerprint(other)


def test_resume_restores_every_array_exactly(tmp_path, small_ds):
    import jax

    from sevo_jax import checkpoint

    # MF-BPR, sevo-adamw: Adam moments, a step count and the graph in the state; at this seed
    # the best validation epoch (2) is not the last (4), so best params != params (seed 0: from
    # MF-BPR's reference init N(0, 1e-4), seed 3's best epoch is the first)
    results, cfg = _fit(tmp_path, small_ds, model="mfbpr", epochs=4, seed=0)
    assert results["best_epoch"] == 2, results["best_epoch"]
    ckpts = checkpoint.RunCheckpoints(tmp_path / "run" / "checkpoints")
    assert ckpts.all_epochs() == [2, 4]
    template = _template(cfg, small_ds)
    state, meta = ckpts.restore(template)
    assert meta["epoch"] == 4 and meta["progress"]["epoch"] == 4
    assert meta["progress"]["best_epoch"] == 2
    assert meta["progress"]["best_valid"] == results["valid"]
    assert meta["rng"] == {"seed": 0, "next_epoch": 5}
    # the graph came from the template, every other array from the checkpoint
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(template)
    assert state["opt_state"][1].graph is template["opt_state"][1].graph
    count = int(state["opt_state"][0].count)
    assert count == 4 * -(-small_ds.train_items.size // 64), count  # 4 epochs of batches of 64
    # the latest step's best params are the params of the best step, which is kept
    best, _ = ckpts.restore(template, epoch=2)
    same = [np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(jax.device_get(state["best_params"])),
        jax.tree_util.tree_leaves(jax.device_get(best["params"])))]
    moved = [np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(jax.device_get(state["best_params"])),
        jax.tree_util.tree_leaves(jax.device_get(state["params"])))]
    assert all(same) and not any(moved)


def test_keeps_the_latest_and_the_best(tmp_path, small_ds):
    import jax.numpy as jnp

    from sevo_jax import checkpoint

    ckpts = checkpoint.RunCheckpoints(tmp_path / "c")
    tree = {"w": jnp.arange(4.0)}
    for epoch, score in [(1, 0.1), (2, 0.3), (3, 0.3), (4, 0.2)]:
        ckpts.save(epoch, tree, {"progress": {}}, score)
    assert ckpts.all_epochs() == [2, 4]  # the best (the earlier of a tie) and the latest
    # a resumed run (another process) still knows which step was best
    reopened = checkpoint.RunCheckpoints(tmp_path / "c")
    reopened.save(5, tree, {"progress": {}}, 0.25)
    assert reopened.all_epochs() == [2, 5]
    reopened.save(6, tree, {"progress": {}}, 0.5)
    assert reopened.all_epochs() == [6]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["6"]


def test_restore_refuses_a_template_it_would_cast_or_cut(tmp_path):
    """Only a table's row count may differ (mesh padding); a vector's length, a dtype, a
    non-array leaf or a missing epoch are one-line errors, not a silent cut or cast."""
    import jax.numpy as jnp

    from sevo_jax import checkpoint

    ckpts = checkpoint.RunCheckpoints(tmp_path / "c")
    state = {"emb": jnp.arange(20.0).reshape(10, 2), "bias": jnp.arange(4.0),
             "step": jnp.asarray(7)}
    ckpts.save(1, state, {"progress": {}}, 0.5)

    def template(**change):
        return {**state, **change}

    for change, message in [
        ({"bias": jnp.zeros(2)}, r"array bias has shape \(4,\), this run expects \(2,\)"),
        ({"bias": jnp.zeros(6)}, r"array bias has shape \(4,\), this run expects \(6,\)"),
        ({"emb": jnp.zeros((10, 3))}, r"array emb has shape \(10, 2\)"),
        ({"emb": jnp.zeros((10, 2), jnp.bfloat16)}, "array emb is float32, this run expects "
                                                    "bfloat16"),
        ({"step": jnp.asarray(0.5)}, "array step is int32, this run expects float32"),
    ]:
        with pytest.raises(ValueError, match=message):
            ckpts.restore(template(**change))
    with pytest.raises(TypeError, match="template's step is a int, not a jax.Array"):
        ckpts.restore(template(step=0))
    with pytest.raises(ValueError, match=r"no checkpoint of epoch 5 .* holds epochs \[1\]"):
        ckpts.restore(state, epoch=5)
    padded, _ = ckpts.restore(template(emb=jnp.zeros((12, 2))))  # a table's padding rows
    np.testing.assert_array_equal(np.asarray(padded["emb"]),
                                  np.concatenate([np.asarray(state["emb"]), np.zeros((2, 2))]))


def test_a_ctrl_c_during_a_save_is_raised_after_the_commit(tmp_path, monkeypatch):
    """A KeyboardInterrupt inside Orbax's save closed its event loop under its writer threads
    (hundreds of lines of tracebacks at exit); now the save finishes and then it is raised."""
    import signal

    import jax.numpy as jnp

    from sevo_jax import checkpoint

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in sevo-train
    ckpts = checkpoint.RunCheckpoints(tmp_path / "c")
    monkeypatch.setattr(checkpoint, "fault_hook",
                        lambda stage, epoch: stage == "before-commit" and os.kill(
                            os.getpid(), signal.SIGINT))
    try:
        with pytest.raises(KeyboardInterrupt):
            ckpts.save(1, {"w": jnp.arange(4.0)}, {"progress": {}}, 0.5)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ckpts.all_epochs() == [1]
    np.testing.assert_array_equal(
        np.asarray(ckpts.restore({"w": jnp.zeros(4)})[0]["w"]), np.arange(4.0))


def test_a_crash_inside_the_write_window_leaves_the_previous_step(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from sevo_jax import checkpoint

    class Killed(Exception):
        pass

    def hook(stage, epoch):
        if (stage, epoch) == ("before-commit", 2):
            raise Killed

    ckpts = checkpoint.RunCheckpoints(tmp_path / "c")
    ckpts.save(1, {"w": jnp.zeros(3)}, {"progress": {}}, 0.1)
    monkeypatch.setattr(checkpoint, "fault_hook", hook)
    with pytest.raises(Killed):
        ckpts.save(2, {"w": jnp.ones(3)}, {"progress": {}}, 0.2)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names[0] == "1" and names[1].startswith("2.orbax-checkpoint-tmp"), names
    reopened = checkpoint.RunCheckpoints(tmp_path / "c")  # cleans the torn step (before a save)
    assert reopened.latest_epoch() == 1
    monkeypatch.setattr(checkpoint, "fault_hook", None)
    reopened.save(2, {"w": jnp.ones(3)}, {"progress": {}}, 0.2)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["2"]
    restored, _ = reopened.restore({"w": jnp.zeros(3)})
    np.testing.assert_array_equal(restored["w"], np.ones(3))


def test_resume_refuses_another_graph_or_data(tmp_path, small_ds, monkeypatch):
    import scipy.sparse as sp

    from sevo_jax import data, training

    _, cfg = _fit(tmp_path, small_ds, model="mfbpr", epochs=1)
    bigger = data.synthetic(num_users=121, num_items=150, num_clusters=6, seq_len=(5, 14), seed=1)
    with pytest.raises(ValueError, match=r"checkpoints/1: the data .* changed since the checkpoint"):
        _fit(tmp_path, bigger, model="mfbpr", epochs=2, resume=True)
    with pytest.raises(ValueError, match=r"checkpoints/1: lr is \S+ in the checkpoint, 0.5 now"):
        _fit(tmp_path, small_ds, model="mfbpr", epochs=2, lr=0.5, resume=True)
    build_graph = training.build_graph
    monkeypatch.setattr(training, "build_graph",
                        lambda config, ds: build_graph(config, ds) + sp.eye(build_graph(config, ds).shape[0]))
    with pytest.raises(ValueError, match=r"^cannot resume \S+/checkpoints/1: the SEvo graph differs "
                                         r"from the one it was trained on \(graph_fingerprint"):
        _fit(tmp_path, small_ds, model="mfbpr", epochs=2, resume=True)


def test_corrupt_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    """A flipped bit in the array data, a cut-short metadata file, a missing file: each is
    refused in one line naming the step and the file (never restored as other numbers)."""
    from sevo_jax.train import main

    out = tmp_path / "run"
    argv = ["--model", "mfbpr", "--features", "8", "--no-progress", "--out", str(out)]
    assert main(argv + ["--epochs", "1"]) == 0
    capsys.readouterr()
    step = out / "checkpoints" / "1"
    resume = argv + ["--epochs", "2", "--resume"]
    data_files = sorted(f for f in (step / "state").rglob("*") if f.parent.name == "d")
    blob = bytearray(data_files[-1].read_bytes())
    blob[len(blob) // 2] ^= 1
    data_files[-1].write_bytes(bytes(blob))
    helpers.fails_cleanly(capsys, resume, f"checkpoint {step} is corrupt: state/")
    data_files[-1].unlink()
    helpers.fails_cleanly(capsys, resume, "is missing")
    (step / "meta" / "metadata").write_text('{"format": 1, "epo')
    helpers.fails_cleanly(capsys, resume, f"checkpoint {step} is corrupt: meta/metadata has")
    (step / "meta" / "files.json").unlink()
    helpers.fails_cleanly(capsys, resume, f"checkpoint {step} is corrupt: its file list")
    assert sorted(p.name for p in out.iterdir()) == [".sevo-train.lock", "checkpoints",
                                                      "metrics.jsonl", "results.json"]


def test_a_pre_orbax_checkpoint_is_refused_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.msgpack").write_bytes(b"old")
    (out / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n')
    helpers.fails_cleanly(capsys, ["--model", "mfbpr", "--epochs", "1", "--no-progress",
                                   "--out", str(out), "--resume"], "before Orbax checkpoints")
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1, "loss": 0.5}\n'


def test_bad_fault_variable_is_one_line(tmp_path, monkeypatch):
    from sevo_jax import checkpoint

    monkeypatch.setenv(checkpoint.FAULT_ENV, "during-save@2")
    with pytest.raises(ValueError, match=r"SEVO_JAX_CHECKPOINT_FAULT='during-save@2': expected"):
        checkpoint.RunCheckpoints(tmp_path / "c")


# --------------------------------------------------------------------------------------------
# Crash tests: SIGKILL at several moments, resume, compare with an uninterrupted run
# --------------------------------------------------------------------------------------------

CLI = ["-m", "sevo_jax.train", "--epochs", "4", "--eval-every", "1", "--features", "8",
       "--no-progress", "--out", "run"]
SEQUENCE_FLAGS = ["--maxlen", "10"]  # not for mfbpr, which has no sequences
# per model, the kills of one crash-and-resume chain: STAGE@EPOCH of sevo_jax.checkpoint
CHAINS = {
    "sasrec": ["after-commit@1", "before-commit@2", "before-save@3"],
    "gru4rec": ["before-commit@2", "after-commit@3", "before-commit@4"],
    "mfbpr": ["before-save@2", "before-commit@3", "after-commit@4"],
}


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    pythonpath = os.pathsep.join(filter(None, [str(helpers.REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath,
            "XLA_FLAGS": "--xla_backend_optimization_level=0",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def _cli(cwd: Path, env: dict, model: str, *extra: str, fault: str | None = None):
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(env)
    env.pop("SEVO_JAX_CHECKPOINT_FAULT", None)
    if fault is not None:
        env["SEVO_JAX_CHECKPOINT_FAULT"] = fault
    flags = [] if model == "mfbpr" else SEQUENCE_FLAGS
    return subprocess.run([sys.executable, *CLI, *flags, "--model", model, *extra], cwd=cwd,
                          env=env, check=False, capture_output=True, text=True, timeout=300)


def _strip_seconds(path: Path) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in x.items() if k != "train_seconds"} for x in lines]


def _crash_and_resume(root: Path, env: dict, model: str) -> None:
    """An uninterrupted run, then the kills of ``CHAINS[model]`` each followed by a resume."""
    ref = _cli(root / "ref", env, model)
    assert ref.returncode == 0, ref.stderr[-3000:]
    crash = root / "crash"
    ckpt_dir = crash / "run" / "checkpoints"
    for k, fault in enumerate(CHAINS[model]):
        proc = _cli(crash, env, model, *(["--resume"] if k else []), fault=fault)
        assert proc.returncode == -9, (fault, proc.returncode, proc.stderr[-3000:])
        stage, epoch = fault.split("@")
        epoch = int(epoch)
        names = sorted(p.name for p in ckpt_dir.iterdir())
        committed = [int(n) for n in names if n.isdigit()]
        assert max(committed) == (epoch if stage == "after-commit" else epoch - 1), (fault, names)
        torn = [n for n in names if n.startswith(f"{epoch}.orbax-checkpoint-tmp")]
        assert bool(torn) == (stage == "before-commit"), (fault, names)  # the write window
        logged = [x["epoch"] for x in _strip_seconds(crash / "run" / "metrics.jsonl")]
        assert logged[-1] == epoch, (fault, logged)  # the log line precedes the checkpoint
        assert not (crash / "run" / "results.json").exists()
    done = _cli(crash, env, model, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (crash / "run" / "results.json").read_bytes() == (root / "ref" / "run" /
                                                               "results.json").read_bytes()
    assert _strip_seconds(crash / "run" / "metrics.jsonl") == _strip_seconds(
        root / "ref" / "run" / "metrics.jsonl")
    results = json.loads((crash / "run" / "results.json").read_text())
    kept = sorted(int(p.name) for p in ckpt_dir.iterdir())
    assert kept == sorted({results["best_epoch"], 4}), kept


@pytest.fixture(scope="module")
def crash_runs(tmp_path_factory, cli_env):
    """``{model: None or the exception}``: the three chains, two at a time."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("crash")

    def run(model):
        try:
            _crash_and_resume(root / model, cli_env, model)
        except Exception as e:  # noqa: BLE001 - reported by the model's own test
            return e
        return None

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CHAINS, pool.map(run, CHAINS)))


@pytest.mark.parametrize("model", list(CHAINS))
def test_killed_runs_resume_to_the_uninterrupted_result(crash_runs, model):
    if crash_runs[model] is not None:
        raise crash_runs[model]


def test_sigkills_at_random_moments_resume_to_the_uninterrupted_result(tmp_path, cli_env):
    """An MF-BPR run killed with SIGKILL at three seeded-random moments (anywhere: start-up,
    training, evaluation, a checkpoint write), each time continued as a user would (``--resume``
    once a checkpoint exists, else ``--overwrite``), ends exactly as an uninterrupted run."""
    import random
    import signal
    import time

    from sevo_jax import training

    t0 = time.perf_counter()
    ref = _cli(tmp_path / "ref", cli_env, "mfbpr")
    assert ref.returncode == 0, ref.stderr[-3000:]
    duration = time.perf_counter() - t0
    rng = random.Random(20261205)
    crash = tmp_path / "crash"
    crash.mkdir()
    env = {k: v for k, v in cli_env.items() if k != "SEVO_JAX_CHECKPOINT_FAULT"}

    def continue_flags():
        if training.has_checkpoint(crash / "run"):
            return ["--resume"]
        return ["--overwrite"] if (crash / "run").exists() else []

    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, *CLI, "--model", "mfbpr", *continue_flags()],
                                cwd=crash, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.1, 0.5) * duration)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    done = _cli(crash, env, "mfbpr", *continue_flags())
    assert done.returncode == 0, done.stderr[-3000:]
    assert kills >= 1  # at least one run really died mid-way (seeded: deterministic count)
    assert (crash / "run" / "results.json").read_bytes() == (tmp_path / "ref" / "run" /
                                                               "results.json").read_bytes()
    assert _strip_seconds(crash / "run" / "metrics.jsonl") == _strip_seconds(
        tmp_path / "ref" / "run" / "metrics.jsonl")


# --------------------------------------------------------------------------------------------
# Meshes: checks run in ONE fresh process with 8 fake CPU devices (they import jax lazily)
# --------------------------------------------------------------------------------------------

# Leaves whose exact gradient is zero (tests/test_sharded_training.py): compared to within lr.
ZERO_GRADIENT_LEAVES = ("['attention']['key']['bias']",)


def _step_fn(cfg, ds):
    """``(template, step(state, key) -> state, batch)`` of a resolved config on its mesh."""
    from sevo_jax import training

    plan = training.mesh_plan(cfg)
    model, optimizer, params, opt_state = training.init_training(cfg, ds, plan)
    shardings = None if plan is None else plan.step_shardings(params, opt_state)
    train_step = training.make_train_step(training.make_loss_fn(cfg, model), optimizer, shardings)
    examples = training.training_examples(cfg, ds)
    rng = np.random.default_rng([cfg.seed, 2])
    batch = next(examples.epoch_batches(training.NegativeSampler(ds), cfg.batch_size, rng))
    if plan is not None:
        batch = plan.put(batch, plan.batch)

    def step(state, key):
        params, opt_state, _ = train_step(state["params"], state["opt_state"], batch, key)
        return {"params": params, "opt_state": opt_state, "best_params": state["best_params"]}

    return {"params": params, "opt_state": opt_state, "best_params": params}, step


def _fitted_to(host: np.ndarray, shape: tuple) -> np.ndarray:
    """``host`` cut or zero-padded along rows to ``shape`` (a mesh's table padding)."""
    rows = min(host.shape[0], shape[0]) if host.ndim else None
    if host.shape == shape:
        return host
    out = np.zeros(shape, host.dtype)
    out[:rows] = host[:rows]
    return out


def check_restore_across_meshes():
    """A SASRec sevo-adamw checkpoint saved under data=8 (item table padded to 152 rows)
    restores under data=8, data=4 and unsharded: every array equals the saved one (padding
    rows dropped or zero), lies in the new run's sharding, and the next train step from it is
    bit-identical to the next step from the saved values placed directly on that mesh; the
    next steps of the three meshes agree to float32 rounding."""
    import dataclasses
    import tempfile

    import jax

    from sevo_jax import checkpoint, data, training

    assert jax.device_count() == helpers.NUM_DEVICES
    ds = data.synthetic(num_users=120, num_items=150, num_clusters=6, seq_len=(5, 14), seed=1)
    cfg8 = training.TrainConfig(optimizer="sevo-adamw", mesh="data=8", seed=3,
                                **SMALL).resolved()
    template8, step8 = _step_fn(cfg8, ds)
    key = jax.random.PRNGKey(5)
    trained = step8(template8, key)  # one step, so that the Adam moments are non-zero
    trained["best_params"] = jax.tree.map(lambda x: x + 0, trained["params"])
    assert trained["params"]["item_embedding"]["embedding"].shape == (152, 16)
    saved = jax.device_get(checkpoint.without_graphs(trained))  # the reference values (small)
    ckpts = checkpoint.RunCheckpoints(Path(tempfile.mkdtemp()) / "checkpoints")
    ckpts.save(1, trained, {**_expected(cfg8, ds), "progress": {"epoch": 1}}, score=0.1)

    next_params = {}
    for mesh in ("data=8", "data=4", None):
        cfg = dataclasses.replace(cfg8, mesh=mesh)
        template, step = _step_fn(cfg, ds)
        restored, meta = ckpts.restore(template)
        assert meta["progress"] == {"epoch": 1}
        rows = ds.num_items + 1 if mesh is None else 152
        got = restored["params"]["item_embedding"]["embedding"].shape
        assert got == (rows, 16) and ds.num_items + 1 < 152, (mesh, got)
        flat_r = jax.tree_util.tree_flatten_with_path(checkpoint.without_graphs(restored))[0]
        flat_t = jax.tree_util.tree_leaves(checkpoint.without_graphs(template))
        for (path, r), s, t in zip(flat_r, jax.tree_util.tree_leaves(saved), flat_t):
            name = f"{mesh} {jax.tree_util.keystr(path)}"
            assert r.sharding.is_equivalent_to(t.sharding, r.ndim), (name, r.sharding)
            np.testing.assert_array_equal(np.asarray(r), _fitted_to(s, r.shape), err_msg=name)
        assert restored["opt_state"][1].graph is template["opt_state"][1].graph

        # the same values placed directly on this mesh, a copy of the template's graph (a step
        # donates its state, graph included)
        placed = jax.tree.map(lambda s, t: jax.device_put(_fitted_to(s, t.shape), t.sharding),
                              saved, checkpoint.without_graphs(template))
        placed = checkpoint.with_graphs(placed, jax.tree.map(lambda x: x + 0, template))
        a = jax.device_get(step(restored, key)["params"])
        b = jax.device_get(step(placed, key)["params"])
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(x, y, err_msg=str(mesh))
        next_params[mesh] = a

    ref = next_params[None]
    for mesh in ("data=8", "data=4"):
        for (path, r), g in zip(jax.tree_util.tree_flatten_with_path(ref)[0],
                                jax.tree_util.tree_leaves(next_params[mesh])):
            name = jax.tree_util.keystr(path)
            tol = cfg8.lr if name.endswith(ZERO_GRADIENT_LEAVES) else 2e-6
            np.testing.assert_allclose(g[: r.shape[0]], r, rtol=tol, atol=tol,
                                       err_msg=f"{mesh} {name}")
            assert not g[r.shape[0]:].any(), (mesh, name)  # padding rows stay zero


CHECKS = helpers.collect_checks(globals())


@pytest.fixture(scope="module")
def mesh_run():
    return helpers.run_checks(__file__, CHECKS, "--xla_backend_optimization_level=0")


@pytest.mark.parametrize("name", list(CHECKS))
def test_mesh(mesh_run, name):
    helpers.assert_check_passed(mesh_run, name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_write_only_their_own_shards(tmp_path, cli_env):
    """2 processes x 4 CPU devices (gloo), ``--distributed --mesh data=8``, MF-BPR (both tables
    row-sharded): each process writes its own shards, about half of the table bytes and less
    than one whole table's worth of the four copies (params, two Adam moments, best params);
    the checkpoint then resumes in ONE unsharded process."""
    env = {**cli_env, "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                        "--xla_backend_optimization_level=0"}
    argv = [sys.executable, "-m", "sevo_jax.train", "--model", "mfbpr", "--features", "8",
            "--no-progress", "--out", str(tmp_path / "run"), "--epochs"]
    port = _free_port()
    procs = [subprocess.Popen(argv + ["1", "--distributed", "--coordinator", f"localhost:{port}",
                                      "--num-processes", "2", "--process-id", str(i),
                                      "--mesh", "data=8"],
                              env=env, cwd=helpers.REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    state = tmp_path / "run" / "checkpoints" / "1" / "state"
    written = {i: sum(f.stat().st_size for f in (state / f"ocdbt.process_{i}").rglob("*")
                      if f.is_file() and f.parent.name == "d")
               for i in range(2)}
    # 1000 users and 1001 item rows (padded to 1008) of 8 float32: one copy of both tables
    tables = (1000 + 1008) * 8 * 4
    assert sorted(p.name for p in state.iterdir() if p.name.startswith("ocdbt.")) == [
        "ocdbt.process_0", "ocdbt.process_1"]
    for i, size in written.items():
        assert 0.35 * 4 * tables < size < 0.65 * 4 * tables, (i, written, tables)
    # ... and it resumes in one process without a mesh (one more epoch)
    one = subprocess.run(argv + ["2", "--resume"], env=cli_env, check=False,
                         cwd=helpers.REPO, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed from" in one.stdout, one.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["epochs_run"] == 2 and results["config"]["mesh"] is None


if __name__ == "__main__":
    helpers.script_main(CHECKS, sys.argv[1:])
