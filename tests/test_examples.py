"""The example scripts run end to end (one epoch on a small synthetic set) and print metrics."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,model", [("sasrec", "sasrec"), ("gru4rec", "gru4rec")])
def test_example_trains_and_reports_the_trainers_metrics(name, model, capsys):
    """Two epochs of the one-page example (SEvo-AdamW): its loss falls, and the validation
    metrics it prints equal the trainer's full-ranking evaluation of the params it returns."""
    from sevo_jax import training

    ex = load_example(name)
    out = ex.main(["--epochs", "2", "--num-users", "200"])
    printed = capsys.readouterr().out
    assert out["losses"][1] < out["losses"][0], out["losses"]
    assert f"NDCG@10 {out['valid']['NDCG@10']:.4f}" in printed.splitlines()[-1]
    cfg = training.TrainConfig(model=model, maxlen=ex.MAXLEN).resolved()
    ds = out["dataset"]
    scorer = training.make_scorer(cfg, out["model"], num_items=ds.num_items)
    want = training.evaluate(cfg, scorer, out["params"], ds, "valid")
    for metric, value in want.items():
        assert out["valid"][metric] == pytest.approx(value, abs=1e-6), metric


@pytest.mark.parametrize("name, argv, needle", [
    ("sasrec", ["--data", "nowhere.txt"], "nowhere.txt: not found"),
    ("gru4rec", ["--epochs", "0"], "--epochs: must be a positive integer, got '0'"),
    ("sasrec", ["--num-users", "-5"], "--num-users: must be a positive integer"),
    ("sasrec_nnx", ["--dropout", "2"], "--dropout must lie in [0, 1), got 2.0"),
])
def test_example_bad_input_is_one_line(name, argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        load_example(name).main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and needle in err[-1] and "Traceback" not in "".join(err), err


def test_example_script_runs_from_the_command_line():
    cmd = [sys.executable, "examples/sasrec.py", "--epochs", "1", "--num-users", "200",
           "--optimizer", "adamw"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch   1  loss" in proc.stdout and "valid (adamw): NDCG@10" in proc.stdout


def test_reproduce_paper_grid_resumes_and_summarises(tmp_path):
    base = [sys.executable, "examples/reproduce_paper.py", "--models", "sasrec", "--optimizers",
            "adamw", "sevo-adamw", "--out", str(tmp_path)]
    run = lambda *extra: subprocess.run(base + list(extra), cwd=ROOT, capture_output=True,  # noqa: E731
                                        text=True, timeout=600)
    first = run("--seeds", "0", "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "| sasrec | adamw | 1 |" in summary and "| sasrec | sevo-adamw | 1 |" in summary
    assert "sevo-train --model sasrec --optimizer sevo-adamw --seed 0" in summary
    results = json.loads((tmp_path / "sasrec-adamw-s0" / "results.json").read_text())
    assert results["train_seconds"] > 0  # summed from metrics.jsonl, so it survives resumes
    # summary of a partly finished grid: seed 1 has not run, nothing is trained
    partial = run("--seeds", "0", "1", "--epochs", "1", "--summary-only")
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "| sasrec | adamw | 1 |" in partial.stdout
    assert not (tmp_path / "sasrec-adamw-s1").exists()
    # the item-item MF-BPR form of the grid: its own row and its exact command
    item = run("--models", "mfbpr-item", "--optimizers", "sevo-adamw", "--seeds", "0",
               "--epochs", "1")
    assert item.returncode == 0, item.stderr[-3000:]
    record = tmp_path / "mfbpr-item-sevo-adamw-s0" / "results.json"
    config = json.loads(record.read_text())["config"]
    assert (config["model"], config["graph"], config["beta"]) == ("mfbpr", "cooccurrence", 0.9)
    # MF-BPR's AdamW baseline is one run on both graphs (AdamW reads no graph): trained once
    baseline = run("--models", "mfbpr", "mfbpr-item", "--optimizers", "adamw", "--seeds", "0",
                   "--epochs", "1")
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    trained = json.loads((tmp_path / "mfbpr-adamw-s0" / "results.json").read_text())
    reused = json.loads((tmp_path / "mfbpr-item-adamw-s0" / "results.json").read_text())
    assert reused["same_run_as"] == str(tmp_path / "mfbpr-adamw-s0")
    assert reused["test"] == trained["test"] and reused["valid"] == trained["valid"]
    assert reused["config"] == trained["config"] | {"out": reused["config"]["out"]}
    assert not (tmp_path / "mfbpr-item-adamw-s0" / "checkpoints").exists()
    assert "not trained again" in baseline.stdout
    sevo = run("--models", "mfbpr", "--optimizers", "sevo-adamw", "--seeds", "0", "--epochs", "1")
    assert sevo.returncode == 0, sevo.stderr[-3000:]  # SEvo reads the graph: trained
    assert "same_run_as" not in json.loads(
        (tmp_path / "mfbpr-sevo-adamw-s0" / "results.json").read_text())
    both = run("--models", "sasrec", "mfbpr-item", "--seeds", "0", "--epochs", "1",
               "--summary-only")
    assert both.returncode == 0, both.stderr[-3000:]
    assert "| sasrec | adamw | 1 |" in both.stdout
    assert "| mfbpr-item | sevo-adamw | 1 |" in both.stdout
    assert ("sevo-train --model mfbpr --graph cooccurrence --optimizer sevo-adamw --seed 0"
            in both.stdout)
    nothing = run("--summary-only", "--out", str(tmp_path / "missing"))
    assert nothing.returncode == 2 and "no finished runs" in nothing.stderr
    assert "Traceback" not in nothing.stderr
    # bad input: one line naming it, no traceback, nothing trained
    for extra, needle in ((["--data", str(tmp_path / "none.txt")], "none.txt: not found"),
                          (["--seeds", "-1"],
                           "seed must be an integer >= 0 below 4,294,967,296, got -1"),
                          (["--epochs", "0"], "epochs must be a positive integer, got 0")):
        bad = run("--seeds", "0", *extra, "--out", str(tmp_path / "bad"))
        assert bad.returncode == 2 and needle in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert not (tmp_path / "bad").exists()
    note = run("--seeds", "0", "--epochs", "1", "--summary-only", "--dataset-key", "beuty")
    assert note.returncode == 0 and "no published numbers for --dataset-key beuty" in note.stdout
    # a finished run is never reused for a grid with other flags or data: one line, untouched
    record = tmp_path / "sasrec-adamw-s0" / "results.json"
    before = record.read_text(), (tmp_path / "sasrec-adamw-s0" / "metrics.jsonl").read_text()
    for extra, needle in (
            (["--epochs", "3"], "was trained with --epochs 1 (this grid: 3)"),
            (["--epochs", "3", "--summary-only"], "was trained with --epochs 1 (this grid: 3)"),
            (["--epochs", "1", "--patience", "2"], "--patience"),
            (["--epochs", "1", "--summary-only", "--data", str(tmp_path / "Beauty.txt")],
             "was trained with --data None")):
        bad = run("--optimizers", "adamw", "--seeds", "0", *extra)
        assert bad.returncode == 2 and needle in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert (record.read_text(), (tmp_path / "sasrec-adamw-s0" / "metrics.jsonl").read_text()
            ) == before
    # another field than the grid's flags (a default changed since the run): a note
    changed = json.loads(before[0])
    changed["config"]["dropout"] = 0.123
    record.write_text(json.dumps(changed))
    noted = run("--optimizers", "adamw", "--seeds", "0", "--epochs", "1", "--summary-only")
    assert noted.returncode == 0 and "sasrec-adamw-s0 was trained with dropout=0.123" in noted.stdout
    # a damaged record (a kill mid-write by an older version): named, nothing else touched
    record.write_text(before[0][:300])
    for extra in ([], ["--summary-only"]):
        bad = run("--optimizers", "adamw", "--seeds", "0", "--epochs", "1", *extra)
        assert bad.returncode == 2 and f"{record} is damaged" in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert record.read_text() == before[0][:300]


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nnx_sasrec_computes_the_linen_function():
    from flax import nnx

    from sevo_jax import models

    ex = load_example("sasrec_nnx")
    seqs = jnp.array([[0, 0, 0, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 0, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8]])
    for mask_padding_keys in (True, False):
        linen = models.SASRec(30, maxlen=8, features=16, num_heads=2,
                              mask_padding_keys=mask_padding_keys)
        params = linen.init(jax.random.PRNGKey(0), seqs, deterministic=True)["params"]
        model = ex.SASRec(30, 8, 16, 2, 2, mask_padding_keys=mask_padding_keys, rngs=nnx.Rngs(1))
        ex.load_linen_params(model, params)
        for inputs in (seqs, seqs[:, 3:]):  # shorter than maxlen: right-aligned positions
            want = linen.apply({"params": params}, inputs, deterministic=True)
            np.testing.assert_array_equal(model(inputs, deterministic=True), want)
        hidden = want[:, -1]
        np.testing.assert_array_equal(model.score_all(hidden),
                                      linen.apply({"params": params}, hidden, method="score_all"))


def test_nnx_example_trains_exactly_as_the_linen_trainer(tmp_path):
    """Same init (Linen params copied in), no dropout: nnx.Optimizer + SEvo-AdamW on the NNX
    model gives the Linen trainer's per-epoch losses and validation metrics."""
    from flax import nnx

    from sevo_jax import data, training

    ex = load_example("sasrec_nnx")
    ds = data.synthetic(num_users=120, num_items=150, num_clusters=6, seq_len=(5, 14), seed=1)
    cfg = training.TrainConfig(optimizer="sevo-adamw", epochs=2, eval_every=1, maxlen=12,
                               features=16, num_blocks=1, batch_size=64, dropout=0.0, seed=2,
                               progress=False, out=str(tmp_path)).resolved()
    linen = training.fit(cfg, dataset=ds, log=lambda s: None)
    linen_losses = [json.loads(line)["loss"]
                    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    _, _, params, _ = training.init_training(cfg, ds)
    model = ex.SASRec(ds.num_items, cfg.maxlen, cfg.features, cfg.num_blocks, cfg.num_heads,
                      cfg.dropout, rngs=nnx.Rngs(0))
    ex.load_linen_params(model, params)
    got = ex.fit_nnx(cfg, ds, model, log=lambda s: None)
    np.testing.assert_allclose(got["losses"], linen_losses, rtol=1e-5)
    assert got["best_epoch"] == linen["best_epoch"]
    for name, value in linen["valid"].items():
        assert got["valid"][name] == pytest.approx(value, abs=1e-6), name


def test_nnx_example_script_trains_and_reports(capsys):
    """The script (NNX init; no dropout, so that three short epochs are not noise) lowers the
    loss every epoch and prints its best validation metrics."""
    ex = load_example("sasrec_nnx")
    result = ex.main(["--epochs", "3", "--eval-every", "1", "--num-users", "150", "--maxlen",
                      "12", "--features", "16", "--batch-size", "16", "--dropout", "0"])
    printed = capsys.readouterr().out.splitlines()
    assert result["losses"][2] < result["losses"][1] < result["losses"][0], result["losses"]
    assert f"NDCG@10 {result['valid']['NDCG@10']:.4f}" in printed[-1], printed
    assert f"best epoch {result['best_epoch']}" in printed[-1]
