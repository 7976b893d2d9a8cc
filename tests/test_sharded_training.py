"""The trainer on a device mesh (``TrainConfig.mesh`` / ``sevo-train --mesh data=8``).

Like tests/test_sharding.py, the multi-device checks need 8 fake CPU devices, i.e. ``XLA_FLAGS``
set before jax is imported, so this file is also a script: ``python tests/test_sharded_training.py``
runs every check named in ``CHECKS`` in ONE fresh process with 8 devices and prints
``PASS name`` / ``FAIL name: ...``; the module-scoped fixture runs it once and each test asserts
on its own line. The command-line checks need no devices and run in-process.

The data set has 150 items, i.e. 151 table rows, which 8 does not divide: every sharded run
here pads the item table to 152 rows (one padding id, 151).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import NUM_DEVICES
SMALL = dict(maxlen=8, features=16, num_blocks=1, batch_size=64, eval_batch_size=128,
             progress=False)
# Leaves whose exact gradient is zero (a softmax ignores a bias shared by all keys): their
# computed gradient is rounding noise, which Adam normalises into a step of size up to lr,
# different for every summation order. They are compared to within the learning rate.
ZERO_GRADIENT_LEAVES = ("['attention']['key']['bias']",)


# --------------------------------------------------------------------------------------------
# Checks run in the 8-device subprocess (they import jax lazily).
# --------------------------------------------------------------------------------------------


def _setup():
    import jax

    from sevo_jax import data

    assert jax.device_count() == NUM_DEVICES, jax.devices()
    ds = data.synthetic(num_users=120, num_items=150, num_clusters=6, seq_len=(5, 14), seed=1)
    return jax, ds


def _row_sharded(x, mesh, axis="data"):
    from jax.sharding import NamedSharding, PartitionSpec

    return x.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(axis, None)), x.ndim)


def _replicated(x, mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return x.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec()), x.ndim)


def _one_step(config, ds, key):
    """(params, opt_state, loss, plan, model, optimizer) after one train step on the first batch."""
    import numpy as np

    from sevo_jax import training

    plan = training.mesh_plan(config)
    model, optimizer, params, opt_state = training.init_training(config, ds, plan)
    shardings = None if plan is None else plan.step_shardings(params, opt_state)
    step = training.make_train_step(training.make_loss_fn(config, model), optimizer, shardings)
    examples = training.training_examples(config, ds)
    rng = np.random.default_rng([config.seed, 1])
    batch = next(examples.epoch_batches(training.NegativeSampler(ds), config.batch_size, rng))
    assert batch["negatives"].max() <= ds.num_items  # padding ids are never sampled
    if plan is not None:
        batch = plan.put(batch, plan.batch)
    params, opt_state, loss = step(params, opt_state, batch, key)
    return params, opt_state, float(loss), plan, model, optimizer


def check_one_step_equals_unsharded():
    """(1)-(3): one sharded SASRec step == the unsharded one (sevo-adamw, adamw); the item table
    and its Adam moments stay row-sharded; the padding row stays exactly zero."""
    jax, ds = _setup()
    import jax.numpy as jnp
    import numpy as np

    from sevo_jax import training
    from sevo_jax.operator_sharded import ShardedGraph

    key = jax.random.PRNGKey(7)
    for optimizer_name in ("sevo-adamw", "adamw"):
        base = training.TrainConfig(optimizer=optimizer_name, **SMALL).resolved()
        ref, _, ref_loss, *_ = _one_step(base, ds, key)
        cfg = training.TrainConfig(optimizer=optimizer_name, mesh="data=8", **SMALL).resolved()
        params, state, loss, plan, model, optimizer = _one_step(cfg, ds, key)
        mesh = plan.mesh
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=optimizer_name)

        # (1) equal params (real rows) to float32 precision
        ref_leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(ref))[0]
        got_leaves = jax.tree_util.tree_leaves(jax.device_get(params))
        for (path, r), g in zip(ref_leaves, got_leaves):
            name = jax.tree_util.keystr(path)
            tol = base.lr if name.endswith(ZERO_GRADIENT_LEAVES) else 2e-6
            np.testing.assert_allclose(g[: r.shape[0]], r, rtol=tol, atol=tol,
                                       err_msg=f"{optimizer_name} {name}")

        # (2) the table and its moments are row-sharded, the rest replicated
        table = params["item_embedding"]["embedding"]
        assert table.shape == (152, 16), table.shape
        assert _row_sharded(table, mesh), table.sharding
        assert _replicated(params["position_embedding"]["embedding"], mesh)
        adam = state[0]
        for moment in (adam.mu, adam.nu):
            assert _row_sharded(moment["item_embedding"]["embedding"], mesh)
            assert _replicated(moment["final_norm"]["scale"], mesh)
        if optimizer_name == "sevo-adamw":
            graph = state[1].graph
            assert isinstance(graph, ShardedGraph) and graph.segments == (152,), graph
            # ... and so is the SEvo update itself, without any output sharding imposed
            grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, p.dtype), params)
            grads = plan.put(grads, plan.param_shardings(params))
            updates, _ = jax.jit(optimizer.update)(grads, state, params)
            assert _row_sharded(updates["item_embedding"]["embedding"], mesh), \
                updates["item_embedding"]["embedding"].sharding

        # (3) the padding row (id 151) and its moments are exactly zero
        for leaf in (table, adam.mu["item_embedding"]["embedding"],
                     adam.nu["item_embedding"]["embedding"]):
            assert not np.asarray(leaf)[151:].any()

        if optimizer_name == "sevo-adamw":  # (3) a padding id is never ranked
            scorer = training.make_scorer(cfg, model, mesh, ds.num_items)
            clean = training.evaluate(cfg, scorer, params, ds, "valid", plan)
            host = jax.tree.map(np.array, jax.device_get(params))
            host["item_embedding"]["embedding"][151:] = np.nan  # would rank above every target
            poisoned = plan.put(host, plan.param_shardings(host))
            leaked = training.evaluate(cfg, scorer, poisoned, ds, "valid", plan)
            assert clean == leaked and np.isfinite(list(clean.values())).all(), (clean, leaked)


def check_fit_matches_unsharded():
    """(4) fit with mesh data=8 for one epoch == the unsharded fit (same seed); (3) uneven
    rows; checkpoint/resume of a sharded run, also under another mesh."""
    jax, ds = _setup()
    import tempfile

    import numpy as np

    from sevo_jax import training

    tmp = Path(tempfile.mkdtemp())
    base = dict(optimizer="sevo-adamw", epochs=1, seed=3, **SMALL)
    ref = training.fit(training.TrainConfig(out=str(tmp / "ref"), **base), dataset=ds,
                       log=lambda s: None)
    cfg = training.TrainConfig(out=str(tmp / "sharded"), mesh="data=8", **base)
    got = training.fit(cfg, dataset=ds, log=lambda s: None)
    for split in ("valid", "test"):
        assert np.isfinite(list(got[split].values())).all(), got[split]
        for k, v in ref[split].items():  # a rank tie flipped by rounding moves one user: 1/120
            assert abs(got[split][k] - v) <= 1.0 / 120 + 1e-9, (split, k, got[split], ref[split])
    loss = lambda run: json.loads((tmp / run / "metrics.jsonl").read_text())["loss"]
    np.testing.assert_allclose(loss("sharded"), loss("ref"), rtol=1e-5)
    assert got["config"]["mesh"] == "data=8" and ref["config"]["mesh"] is None

    # the checkpoint holds the padded table; the padding row never moved from zero
    from sevo_jax import checkpoint

    plan = training.mesh_plan(cfg)
    resolved = cfg.resolved()
    _, _, params, state = training.init_training(resolved, ds, plan)
    ckpts = checkpoint.RunCheckpoints(tmp / "sharded" / "checkpoints")
    restored, meta = ckpts.restore({"params": params, "opt_state": state, "best_params": params})
    table = np.asarray(restored["params"]["item_embedding"]["embedding"])
    assert table.shape == (152, 16) and not table[151:].any() and meta["progress"]["epoch"] == 1

    # resume: nothing left to train, the test split is re-evaluated from the checkpoint
    again = training.fit(cfg, dataset=ds, resume=True, log=lambda s: None)
    assert again["test"] == got["test"] and again["valid"] == got["valid"]
    # another mesh resumes it too (tests/test_checkpoint.py checks the values)
    other = training.fit(training.TrainConfig(out=str(tmp / "sharded"), mesh="data=4", **base),
                         dataset=ds, resume=True, log=lambda s: None)
    for k, v in got["test"].items():
        assert abs(other["test"][k] - v) <= 1.0 / 120 + 1e-9, (k, other["test"], got["test"])


def check_new_models_fit_matches_unsharded():
    """BERT4Rec (its mask token keeps its id; padding rows come after it) and STOSA: one epoch
    with mesh data=8 == the unsharded epoch."""
    jax, ds = _setup()
    import tempfile

    import numpy as np

    from sevo_jax import checkpoint, training

    tmp = Path(tempfile.mkdtemp())
    for model in ("bert4rec", "stosa"):
        base = dict(SMALL, model=model, optimizer="sevo-adamw", epochs=1, seed=3, num_heads=2)
        ref = training.fit(training.TrainConfig(out=str(tmp / model), **base), dataset=ds,
                           log=lambda s: None)
        cfg = training.TrainConfig(out=str(tmp / f"{model}-8"), mesh="data=8", **base)
        got = training.fit(cfg, dataset=ds, log=lambda s: None)
        for split in ("valid", "test"):
            for k, v in ref[split].items():  # a rank tie flipped by rounding: 1/120
                assert abs(got[split][k] - v) <= 1.0 / 120 + 1e-9, (model, split, k)
        loss = [json.loads((tmp / run / "metrics.jsonl").read_text())["loss"]
                for run in (model, f"{model}-8")]
        np.testing.assert_allclose(loss[1], loss[0], rtol=1e-5, err_msg=model)
        if model == "bert4rec":  # 150 items + padding + mask = 152 rows, a multiple of 8
            _, _, params, state = training.init_training(cfg.resolved(), ds,
                                                         training.mesh_plan(cfg))
            restored, _ = checkpoint.RunCheckpoints(tmp / f"{model}-8" / "checkpoints").restore(
                {"params": params, "opt_state": state, "best_params": params})
            rows = ds.num_items + 2
            for table in ("item_embedding", "output_embedding"):
                weights = np.asarray(restored["params"][table]["embedding"])
                assert weights.shape[0] % 8 == 0 and weights.shape[0] >= rows, weights.shape
                assert not weights[rows:].any() and weights[rows - 1].any(), table


def check_mesh_smaller_than_device_count():
    """data=4 on 8 devices: a mesh over the first 4 (size divides the device count)."""
    jax, _ = _setup()
    from sevo_jax import sharding

    mesh = sharding.build_mesh("data=4")
    assert mesh.shape == {"data": 4} and list(mesh.devices.flat) == jax.devices()[:4]
    for bad in ("data=3", "data=16"):
        try:
            sharding.build_mesh(bad)
        except ValueError as e:
            assert "jax.device_count() = 8" in str(e), e
        else:
            raise AssertionError(bad)


CHECKS = helpers.collect_checks(globals())


@pytest.fixture(scope="module")
def sharded_run():
    # LLVM -O0: the checks are compile-bound and compare two programs compiled alike; the
    # sharding passes are HLO passes and run as usual
    return helpers.run_checks(__file__, CHECKS, "--xla_backend_optimization_level=0")


@pytest.mark.parametrize("name", list(CHECKS))
def test_sharded_training(sharded_run, name):
    helpers.assert_check_passed(sharded_run, name)


# Command line, in-process (no devices needed: these fail before anything is built).


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--mesh", "data"], "NAME=SIZE"),
        (["--mesh", "data=0"], "NAME=SIZE"),
        (["--mesh", "data=4,model=2"], "NAME=SIZE"),
        (["--mesh", "=8"], "NAME=SIZE"),
        (["--mesh", "data=x"], "NAME=SIZE"),
        (["--mesh", "data=3"], "--batch-size 512"),  # the default batch does not split into 3
        # more devices than this process has
        (["--mesh", "data=1024", "--batch-size", "1024"], "jax.device_count()"),
        (["--process-id", "1"], "--process-id needs --distributed"),
    ],
)
def test_bad_mesh_is_one_line(capsys, tmp_path, argv, needle):
    helpers.fails_cleanly(capsys, argv + ["--out", str(tmp_path), "--no-progress"], needle)


def test_mesh_spec_parsing():
    from sevo_jax import sharding, training

    assert sharding.parse_mesh_spec("data=8") == ("data", 8)
    assert sharding.parse_mesh_spec(" x = 2 ") == ("x", 2)
    with pytest.raises(ValueError, match="NAME=SIZE"):
        training.TrainConfig(mesh="data:8").validate()
    with pytest.raises(ValueError, match="batch_size 100 must be a multiple of the mesh size 8"):
        training.TrainConfig(mesh="data=8", batch_size=100).validate()


def test_distributed_and_mesh_flags_parse():
    from sevo_jax.train import build_parser, config_from_args

    args = build_parser().parse_args(["--mesh", "data=8", "--distributed", "--coordinator",
                                      "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1"])
    assert args.distributed and args.mesh == "data=8"
    assert (args.coordinator, args.num_processes, args.process_id) == ("10.0.0.1:1234", 2, 1)
    assert config_from_args(args).mesh == "data=8"
    assert not build_parser().parse_args([]).distributed
    assert config_from_args(build_parser().parse_args([])).mesh is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    """The multi-host path for real: 2 processes x 4 CPU devices (gloo collectives) with
    ``--distributed --mesh data=8`` end with the metrics of an unsharded single-process run."""
    base = [sys.executable, "-m", "sevo_jax.train", "--epochs", "1", "--eval-every", "1",
            "--no-progress"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
    port = _free_port()
    procs = [subprocess.Popen(base + ["--distributed", "--coordinator", f"localhost:{port}",
                                      "--num-processes", "2", "--process-id", str(i),
                                      "--mesh", "data=8", "--out", str(tmp_path / "multi")],
                              env=env, cwd=helpers.REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    single = subprocess.run(base + ["--out", str(tmp_path / "single")], env=env, cwd=helpers.REPO,
                            capture_output=True, text=True, timeout=600)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert single.returncode == 0, single.stderr[-3000:]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    multi = json.loads((tmp_path / "multi" / "results.json").read_text())
    one = json.loads((tmp_path / "single" / "results.json").read_text())
    assert multi["config"]["mesh"] == "data=8" and one["config"]["mesh"] is None
    for split in ("valid", "test"):
        assert multi[split] == pytest.approx(one[split], abs=1e-6), split


if __name__ == "__main__":
    helpers.script_main(CHECKS, sys.argv[1:])
