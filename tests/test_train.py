"""The command line and fit's handling of its output folder: validation before any work,
used and locked folders, log repair, resume edge cases, errors that name their subject
(issue 12). Every run is MF-BPR + AdamW (the cheapest to compile: none of this depends on
the model) on a tiny CSV for an epoch or two."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sevo_jax import training
from sevo_jax.train import main
from tests import helpers

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "mfbpr", "--optimizer", "adamw", "--features", "8", "--batch-size", "64",
        "--no-progress", "--eval-every", "1"]
TINY_SEQUENTIAL = ["--features", "8", "--maxlen", "8", "--batch-size", "64", "--no-progress"]


def _rows(num_users=20, length=6, num_items=25):
    return [(u, (3 * u + 5 * k) % num_items, k) for u in range(num_users) for k in range(length)]


@pytest.fixture()
def tiny_csv(tmp_path) -> Path:
    path = tmp_path / "log.csv"
    path.write_text("".join(f"{u},{i},{t}\n" for u, i, t in _rows()))
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _fails(capsys, argv, *needles) -> str:
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, (code, err)
    for needle in needles:
        assert needle in err, err
    return err


# ---- item 7: every field checked before any data is read ---------------------------------------

BAD_VALUES = {
    "model": "bert", "data": "", "format": "parquet", "optimizer": "lamb", "graph": "knn",
    "epochs": 0, "batch_size": -1, "lr": 0.0, "weight_decay": -0.1, "b1": 1.0, "b2": -0.5,
    "eps": 0.0, "momentum": 1.0, "beta": 1.0, "num_layers": -1, "approx": "exact", "H": 0,
    "maxlen": 0, "features": 2.5, "num_blocks": 0, "num_heads": 0, "dropout": 1.0, "seed": -1,
    "eval_every": 0, "patience": 0, "eval_batch_size": 0, "kcore": -1, "keep_duplicates": "yes",
    "cache_dir": 3, "out": "", "progress": None, "mesh": 8, "attention_dropout": 1.0,
    "mask_prob": -0.1, "pvn_weight": -1.0, "lr_decay_factor": 0.0, "lr_decay_every": 0,
    "length_bucket": 0, "pack_rows": "yes",
    "dropout_bits": 8, "compile_cache": "yes",
}


def test_validate_walks_every_config_field():
    fields = {f.name for f in dataclasses.fields(training.TrainConfig)}
    assert set(BAD_VALUES) == fields  # a new field needs a rule and a bad value here
    training.TrainConfig().validate()
    for name, bad in BAD_VALUES.items():
        extra = {"format": "csv"} if name == "data" else {}
        with pytest.raises(training.ConfigError) as info:
            dataclasses.replace(training.TrainConfig(), **{name: bad}, **extra).validate()
        assert info.value.field == name and str(info.value).startswith(name + " ")
        assert repr(bad) in str(info.value)
    for name, nan in (("lr", float("nan")), ("b1", float("inf")), ("seed", True)):
        with pytest.raises(training.ConfigError, match=name):
            dataclasses.replace(training.TrainConfig(), **{name: nan}).validate()


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--seed", "-1", "--seed must be an integer >= 0 below 4,294,967,296, got -1"),
        ("--seed", "4294967296", "--seed must be an integer >= 0 below 4,294,967,296"),
        ("--b1", "1.5", "--b1 must lie in [0, 1), got 1.5"),
        ("--b2", "1", "--b2 must lie in [0, 1), got 1.0"),
        ("--eps", "0", "--eps must be a finite number > 0"),
        ("--lr", "0", "--lr must be a finite number > 0"),
        ("--lr", "nan", "--lr must be a finite number > 0"),
        ("--momentum", "1", "--momentum must lie in [0, 1)"),
        ("--dropout", "1", "--dropout must lie in [0, 1)"),
        ("--kcore", "-2", "--kcore must be an integer >= 0"),
        ("--num-layers", "-1", "--num-layers must be an integer >= 0"),
        ("--H", "0", "--H must be a positive integer"),
        ("--eval-batch-size", "0", "--eval-batch-size must be a positive integer"),
        ("--length-bucket", "0", "--length-bucket must be a positive integer"),
    ],
)
def test_bad_numbers_name_the_flag_before_the_data_is_read(capsys, tmp_path, flag, value, expected):
    # the data file does not exist: the flag is reported first, and nothing is created
    _fails(capsys, ["--data", tmp_path / "nowhere.csv", flag, value, "--out", tmp_path / "o"],
           expected)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--optimizer", "adamw", "--momentum", "0.9"],
     "--momentum applies to sgd, sevo-sgd only; adamw does not use it"),
    (["--optimizer", "sgd", "--b2", "0.9"], "--b2 applies to adamw, sevo-adamw, adam, sevo-adam"),
    (["--optimizer", "adamw", "--beta", "0.5"], "--beta applies to sevo-adamw, sevo-adam, sevo-sgd"),
    (["--optimizer", "adam", "--graph", "cooccurrence"], "--graph applies to sevo-"),
    (["--optimizer", "sgd", "--num-layers", "7"], "--num-layers applies to sevo-"),
])
def test_a_flag_the_optimizer_does_not_read_is_an_error(capsys, tmp_path, argv, expected):
    _fails(capsys, argv + ["--out", tmp_path / "o"], expected)
    assert not (tmp_path / "o").exists()
    # a value equal to the default is no setting: accepted
    for name, value in (("beta", 0.99), ("num_layers", 3), ("b1", 0.9), ("graph", "auto")):
        dataclasses.replace(training.TrainConfig(optimizer="sgd"), **{name: value}).validate()


@pytest.mark.parametrize("argv, expected", [
    (["--model", "mfbpr", "--dropout", "0.5"], "--dropout applies to sasrec, gru4rec, bert4rec "
     "and stosa only; mfbpr has no dropout"),
    (["--model", "mfbpr", "--maxlen", "3"], "--maxlen applies to mfbpr only on the co-occurrence"),
    (["--model", "mfbpr", "--H", "4"], "--H applies to the co-occurrence graph only; the "
     "user-item graph does not use it"),
    (["--graph", "category", "--H", "7"], "the category graph does not use it"),
    (["--lr-decay-every", "1"], "--lr-decay-every has no effect while --lr-decay-factor is 1"),
    (["--cache-dir", "somewhere"], "--cache-dir applies to data read from a file"),
    (["--keep-duplicates"], "--keep-duplicates applies to timestamped rows"),
])
def test_a_setting_that_this_run_never_reads_is_an_error(capsys, tmp_path, argv, expected):
    _fails(capsys, argv + ["--out", tmp_path / "o"], expected)
    assert not (tmp_path / "o").exists()
    # the defaults, and the settings where they are read, pass
    for fields in ({"model": "mfbpr", "dropout": 0.0}, {"model": "mfbpr", "maxlen": 50},
                   {"model": "mfbpr", "graph": "cooccurrence", "maxlen": 3, "H": 2},
                   {"lr_decay_every": 25}, {"lr_decay_factor": 0.5, "lr_decay_every": 3},
                   {"model": "mfbpr", "optimizer": "adamw", "H": 1}):
        dataclasses.replace(training.TrainConfig(), **fields).validate()


def test_out_of_memory_is_one_line(capsys, monkeypatch, tmp_path):
    import jax

    for error in (MemoryError("Unable to allocate 3.73 GiB for an array"),
                  jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating "
                                             "1600000000 bytes.\nmore detail")):
        def fit(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(training, "fit", fit)
        _fails(capsys, ["--out", tmp_path / "o"], "error: out of memory (", "lower --batch-size")
    monkeypatch.setattr(training, "fit", lambda *a, **k: (_ for _ in ()).throw(
        jax.errors.JaxRuntimeError("INTERNAL: something else")))
    with pytest.raises(jax.errors.JaxRuntimeError):  # not an allocation: not hidden
        _run(capsys, "--out", tmp_path / "o")


def test_an_interrupt_says_whether_there_is_a_run_to_resume(capsys, monkeypatch, tmp_path,
                                                            tiny_csv):
    out = tmp_path / "o"
    assert _run(capsys, "--data", tiny_csv, "--epochs", "1", *TINY, "--out", out)[0] == 0

    def fit(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(training, "fit", fit)
    code, _, err = _run(capsys, "--data", tiny_csv, "--out", tmp_path / "new")
    assert code == 130 and err.strip() == ("sevo-train: interrupted before the run's first "
                                           "checkpoint; nothing to resume")
    code, _, err = _run(capsys, "--data", tiny_csv, "--out", out, "--resume")
    assert code == 130 and err.strip() == ("sevo-train: interrupted; resume with --resume "
                                           f"--out {out}")


def test_length_bucket_needs_a_sequence_model(capsys, tmp_path):
    _fails(capsys, ["--model", "mfbpr", "--length-bucket", "5", "--out", tmp_path / "o"],
           "--length-bucket applies to sequence models; mfbpr has no sequences")
    assert not (tmp_path / "o").exists()

def test_no_training_example_is_an_error(capsys, tmp_path):
    path = tmp_path / "three.csv"  # every user has 3 interactions: one to train on
    path.write_text("".join(f"{u},{u + k},{k}\n" for u in range(10) for k in range(3)))
    for model in ("sasrec", "gru4rec"):
        _fails(capsys, ["--data", path, "--model", model, "--epochs", "1", *TINY_SEQUENTIAL,
                        "--out", tmp_path / model], "three.csv: no training example", model)


def test_data_stats_reports_dropped_duplicates_and_users(capsys, tmp_path):
    rows = _rows(num_users=4) + [(9, 1, 1), (9, 2, 2)]  # user 9 is too short
    path = tmp_path / "log.txt"  # the name says nothing; the content says csv
    path.write_text("".join(f"{u},{i},{t}\n" for u, i, t in rows + rows[:5]))
    code, out, _ = _run(capsys, "--data", path, "--data-stats")
    stats = json.loads(out)
    assert code == 0 and stats["format"] == "csv"
    assert stats["users"] == 4 and stats["interactions"] == 24
    assert stats["duplicates_dropped"] == 5 and stats["users_dropped"] == 1
    code, out, _ = _run(capsys, "--data", path, "--data-stats", "--keep-duplicates")
    assert code == 0 and json.loads(out)["duplicates_dropped"] == 0


def test_run_output_reports_the_data(capsys, tmp_path, tiny_csv):
    code, out, _ = _run(capsys, "--data", tiny_csv, "--epochs", "1", *TINY, "--out", tmp_path / "o")
    assert code == 0 and "dropped 0 duplicate rows and 0 users" in out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["data"]["duplicates_dropped"] == 0 and results["data"]["users_dropped"] == 0
    assert len(results["data"]["fingerprint"]) == 16


# ---- item 3: a used folder is never clobbered; a live run's folder is refused ----------------


def test_a_used_out_is_refused_unless_overwrite(capsys, tmp_path, tiny_csv):
    out = tmp_path / "o"
    base = ["--data", tiny_csv, "--epochs", "1", *TINY, "--out", out]
    assert _run(capsys, *base)[0] == 0
    def contents():
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = contents()
    _fails(capsys, base, f"{out} already holds a run", "metrics.jsonl", "--overwrite", "--resume")
    assert contents() == before  # nothing touched
    _fails(capsys, base + ["--resume", "--overwrite"], "exclude each other")
    code, out_text, _ = _run(capsys, *base, "--overwrite", "--seed", "1")
    assert code == 0 and "overwrite: deleted" in out_text
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 1


def test_overwrite_that_fails_before_writing_keeps_the_previous_run(capsys, tmp_path, tiny_csv):
    """--overwrite deletes the old run only once the new one has its data, model and graph: a
    command that fails on its data first leaves every file as it was (and a run killed in
    between gets its predecessor back at the next claim of the folder)."""
    out = tmp_path / "o"
    assert _run(capsys, "--data", tiny_csv, "--epochs", "1", *TINY, "--out", out)[0] == 0

    def contents():
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()
                and p.name != training.LOCK_FILE}

    before = contents()
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n")
    _fails(capsys, ["--data", bad, "--epochs", "1", *TINY, "--out", out, "--overwrite"],
           "bad.csv")
    assert contents() == before
    assert not (out / training.REPLACED_DIR).exists()
    # a run killed after setting the old run aside: the next command puts it back first
    (out / training.REPLACED_DIR).mkdir()
    for name in ("metrics.jsonl", "results.json", training.CHECKPOINT_DIR):
        (out / name).rename(out / training.REPLACED_DIR / name)
    _fails(capsys, ["--data", tiny_csv, "--epochs", "1", *TINY, "--out", out],
           f"{out} already holds a run")
    assert contents() == before
    code, text, _ = _run(capsys, "--data", tiny_csv, "--epochs", "1", *TINY, "--out", out,
                         "--overwrite", "--seed", "1")
    assert code == 0 and "overwrite: deleted metrics.jsonl, results.json, checkpoints" in text
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 1
    assert not (out / training.REPLACED_DIR).exists()


def test_overwrite_that_fails_in_training_keeps_the_previous_run(capsys, tmp_path, tiny_csv):
    """The old run was deleted once the new one had its data and model: a new run that then
    failed in its second epoch (before its first checkpoint) lost it. Now it is put back, in
    place of what the failed run wrote, and deleted only after the new run's first
    checkpoint."""
    out = tmp_path / "o"
    assert _run(capsys, "--data", tiny_csv, "--epochs", "1", *TINY, "--out", out)[0] == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()
              and p.name != training.LOCK_FILE}
    err = _fails(capsys, ["--data", tiny_csv, "--epochs", "3", *TINY, "--eval-every", "3",
                          "--lr", "1e30", "--out", out, "--overwrite"], "nan")
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()
            and p.name != training.LOCK_FILE} == before, err
    assert not (out / training.REPLACED_DIR).exists()


def test_an_out_that_cannot_be_a_folder_is_one_line_naming_the_flag(capsys, tmp_path, tiny_csv):
    (tmp_path / "f").write_text("keep")
    base = ["--data", tiny_csv, "--epochs", "1", *TINY, "--out"]
    _fails(capsys, base + [tmp_path / "f"], "--out", "is a file, not a folder")
    _fails(capsys, base + [tmp_path / "f" / "sub"], "--out", "cannot be written")
    assert (tmp_path / "f").read_text() == "keep"


def test_a_run_that_fails_before_its_first_checkpoint_leaves_the_folder_reusable(
        capsys, tmp_path, tiny_csv):
    base = ["--data", tiny_csv, "--epochs", "1", *TINY]
    _fails(capsys, base + ["--lr", "1e30", "--out", tmp_path / "new"], "nan")
    assert not (tmp_path / "new").exists()  # created by the run: removed
    (tmp_path / "runs").mkdir()
    _fails(capsys, base + ["--lr", "1e30", "--out", tmp_path / "runs" / "a" / "b"], "nan")
    assert os.listdir(tmp_path / "runs") == []  # and the parent folders it made for it
    (tmp_path / "runs" / "a").mkdir()
    (tmp_path / "runs" / "a" / "keep").write_text("x")  # not empty: kept
    _fails(capsys, base + ["--lr", "1e30", "--out", tmp_path / "runs" / "a" / "b" / "c"], "nan")
    assert sorted(os.listdir(tmp_path / "runs" / "a")) == ["keep"]
    (tmp_path / "old").mkdir()
    _fails(capsys, base + ["--lr", "1e30", "--out", tmp_path / "old"], "nan")
    assert _run(capsys, *base, "--out", tmp_path / "old")[0] == 0  # an empty checkpoints/: no run


def test_parameters_that_overflow_in_the_last_update_are_an_error(capsys, tmp_path, tiny_csv):
    """One step per epoch: the loss (taken before the update) is finite, the updated
    parameters score NaN. Before, every metric came out 0 and the run reported success."""
    _fails(capsys, ["--data", tiny_csv, "--epochs", "1", *TINY, "--batch-size", "512", "--lr",
                    "1e30", "--out", tmp_path / "o"], "valid scores are NaN or inf")
    assert not (tmp_path / "o").exists()


def test_a_learning_rate_that_grows_out_of_float32_is_an_error(capsys, tmp_path, tiny_csv):
    """A growing --lr-decay-factor is named: before the run when the schedule leaves float32,
    in the non-finite loss message when it only diverges."""
    base = ["--data", tiny_csv, *TINY, "--lr-decay-every", "1", "--out", tmp_path / "o"]
    _fails(capsys, base + ["--epochs", "3", "--lr-decay-factor", "1e300"],
           "--lr-decay-factor 1e+300 takes the learning rate 0.001 to about 1e597 by epoch 3")
    assert not (tmp_path / "o").exists()
    _fails(capsys, base + ["--epochs", "3", "--lr-decay-factor", "1e18"],
           "lower --lr or --lr-decay-factor")
    dataclasses.replace(training.TrainConfig(), lr_decay_factor=1e30, lr_decay_every=1,
                        epochs=1).validate()   # never grows within the run


def test_a_graph_without_edges_is_an_error(capsys, tmp_path):
    path = tmp_path / "seq.txt"  # --maxlen 1: no two items co-occur
    path.write_text("".join(f"{u} " + " ".join(str(1 + (u + k) % 9) for k in range(6)) + "\n"
                            for u in range(1, 21)))
    _fails(capsys, ["--data", path, "--epochs", "1", *TINY_SEQUENTIAL, "--maxlen", "1",
                    "--out", tmp_path / "o"], "graph of seq has no edges", "smooth nothing")
    assert not (tmp_path / "o").exists()


def test_resume_without_a_checkpoint_is_an_error(capsys, tmp_path, tiny_csv):
    _fails(capsys, ["--data", tiny_csv, "--epochs", "1", *TINY, "--resume", "--out",
                    tmp_path / "fresh"], "cannot resume", "holds no checkpoint")
    assert not (tmp_path / "fresh").exists()  # a run that wrote nothing leaves no folder


def test_second_process_on_a_live_out_is_refused_and_a_killed_run_leaves_no_lock(
        capsys, tmp_path, tiny_csv):
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get(
        "PYTHONPATH")])), "JAX_PLATFORMS": "cpu"}
    first = subprocess.Popen(
        [sys.executable, "-m", "sevo_jax.train", "--data", str(tiny_csv), "--epochs", "100000",
         *TINY, "--out", str(out)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        lock = out / training.LOCK_FILE
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run never locked its folder"
            time.sleep(0.1)
        for extra in ([], ["--overwrite"], ["--resume"]):  # none may touch a live run's folder
            _fails(capsys, ["--data", tiny_csv, "--epochs", "1", *TINY, "--out", out, *extra],
                   f"{out} is in use by another run (pid {first.pid})")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        first.stderr.close()
    # the OS released the dead run's lock: the folder is usable again, with an explicit flag
    assert _run(capsys, "--data", tiny_csv, "--epochs", "1", *TINY, "--out", out,
                "--overwrite")[0] == 0


# ---- item 5: log repair never drops a complete record ----------------------------------------


def _fit(tmp_path, tiny, epochs, resume=False):
    config = training.TrainConfig(model="mfbpr", optimizer="adamw", format="csv", data=str(tiny),
                                  epochs=epochs, features=8, batch_size=64, eval_every=1,
                                  progress=False, out=str(tmp_path / "run"))
    messages = []
    return training.fit(config, log=messages.append, resume=resume), messages


def test_a_damaged_middle_line_is_an_error_and_is_kept(tmp_path, tiny_csv):
    _fit(tmp_path, tiny_csv, 2)
    log = tmp_path / "run" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    for bad_line in ("garbage", "{}", '{"epoch": "two"}', "[1, 2]"):
        damaged = "\n".join([lines[0], bad_line, lines[1]]) + "\n"
        log.write_text(damaged)
        with pytest.raises(ValueError) as info:
            _fit(tmp_path, tiny_csv, 3, resume=True)
        message = str(info.value)
        assert f"{log}:2: found" in message and "\n" not in message, message
        assert "repair or delete" in message
        assert log.read_text() == damaged  # nothing dropped


def test_only_a_cut_short_last_line_is_dropped_and_reported(tmp_path, tiny_csv):
    _fit(tmp_path, tiny_csv, 2)
    log = tmp_path / "run" / "metrics.jsonl"
    complete = log.read_text()
    log.write_text(complete + '{"epoch": 3, "loss": 0.6')  # killed while writing epoch 3
    _, messages = _fit(tmp_path, tiny_csv, 3, resume=True)
    note = next(m for m in messages if m.startswith("resumed from"))
    assert "dropped the cut-short last line" in note and '{"epoch": 3, "loss": 0.6' in note
    lines = log.read_text().splitlines()
    assert lines[:2] == complete.splitlines() and [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


# ---- item 6: resume edge cases ------------------------------------------------------------------


def test_resume_refuses_changed_data_in_one_line(capsys, tmp_path, tiny_csv):
    base = ["--data", tiny_csv, *TINY, "--out", tmp_path / "o"]
    assert _run(capsys, *base, "--epochs", "1")[0] == 0
    tiny_csv.write_text(tiny_csv.read_text().replace("0,0,0\n", "0,1,0\n"))
    _fails(capsys, base + ["--epochs", "2", "--resume"], "changed since the checkpoint",
           str(tiny_csv))


def test_resume_accepts_harmless_differences(capsys, tmp_path, tiny_csv, monkeypatch):
    out = tmp_path / "o"
    assert _run(capsys, "--data", tiny_csv, *TINY, "--epochs", "1", "--out", out)[0] == 0
    monkeypatch.chdir(tmp_path)  # the data path relative now, the out path spelled differently
    argv = ["--data", "log.csv", *TINY, "--epochs", "2", "--resume", "--out", "./o/",
            "--eval-batch-size", "7"]
    code, printed, err = _run(capsys, *argv)
    assert code == 0, err
    assert "resumed from" in printed and "best epoch" in printed
    assert "training to epoch 2 (the run was started for 1)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_run"] == 2 and results["config"]["eval_batch_size"] == 7
    # the finished run's record was moved aside while it trained on, not left as if current
    assert json.loads((out / "results.previous.json").read_text())["epochs_run"] == 1
    # trained on once more: both earlier records are kept
    argv[argv.index("2")] = "3"
    code, printed, err = _run(capsys, *argv)
    assert code == 0 and "to results.previous.2.json" in printed, err
    assert json.loads((out / "results.previous.json").read_text())["epochs_run"] == 1
    assert json.loads((out / "results.previous.2.json").read_text())["epochs_run"] == 2
    # --overwrite sets every record aside with the run, and deletes them once it writes
    code, printed, err = _run(capsys, "--data", "log.csv", *TINY, "--epochs", "1", "--out",
                              out, "--overwrite")
    assert code == 0 and "results.previous.2.json of the previous run" in printed, err
    assert not list(out.glob("results.previous*"))


def test_resume_with_fewer_epochs_than_done_is_refused(capsys, tmp_path, tiny_csv):
    base = ["--data", tiny_csv, *TINY, "--out", tmp_path / "o"]
    assert _run(capsys, *base, "--epochs", "2")[0] == 0
    _fails(capsys, base + ["--epochs", "1", "--resume"], "epochs 1 is fewer than the 2")


def test_resume_conflicts():
    saved = dataclasses.asdict(training.TrainConfig(format="csv", data="a/log.csv", epochs=4))
    saved[training.DATA_FINGERPRINT] = "abc"
    same = dict(saved, out="elsewhere", eval_batch_size=3, progress=False, data="/x/log.csv")
    assert training.resume_conflicts(saved, same, epochs_done=4) == []
    assert training.resume_conflicts(saved, dict(same, epochs=6), epochs_done=4) == []
    (why,) = training.resume_conflicts(saved, dict(same, lr=0.5), epochs_done=4)
    assert why.startswith("lr is None in the checkpoint, 0.5 now")
    (why,) = training.resume_conflicts(saved, dict(same, data_fingerprint="def"))
    assert "/x/log.csv changed since the checkpoint" in why
    (why,) = training.resume_conflicts(saved, dict(same, epochs=2), epochs_done=4)
    assert "epochs 2 is fewer than the 4" in why
    older = {k: v for k, v in saved.items() if k not in ("keep_duplicates", "data_fingerprint")}
    assert training.resume_conflicts(older, dict(saved, data="a/./log.csv")) == []
    assert training.resume_conflicts(older, dict(saved, data="b/log.csv")) != []


def test_resume_of_a_checkpoint_from_before_dropout_bits_keeps_its_32_bit_masks():
    new = dataclasses.asdict(training.TrainConfig(model="sasrec").resolved())
    assert new["dropout_bits"] == 16
    older = {k: v for k, v in new.items() if k != "dropout_bits"}
    (why,) = training.resume_conflicts(older, new)
    assert why == "dropout_bits is 32 in the checkpoint, 16 now"
    assert training.resume_conflicts(older, dict(new, dropout_bits=32)) == []
    mfbpr = dataclasses.asdict(training.TrainConfig(model="mfbpr").resolved())
    assert mfbpr["dropout_bits"] is None  # no dropout: the field stays unused
    assert training.resume_conflicts({k: v for k, v in mfbpr.items() if k != "dropout_bits"},
                                     mfbpr) == []


def test_fields_a_model_does_not_read_never_block_a_resume():
    """GRU4Rec runs of earlier sessions recorded num_blocks 2 / num_heads 1 (then every
    config's defaults); GRU4Rec reads neither, and passing them now is an error."""
    new = dataclasses.asdict(training.TrainConfig(model="gru4rec").resolved())
    older = dict(new, num_blocks=2, num_heads=1)
    assert training.resume_conflicts(older, new) == []
    assert training.resume_conflicts(older, dict(new, lr=0.5)) == [
        "lr is 0.001 in the checkpoint, 0.5 now"]
    sasrec = dataclasses.asdict(training.TrainConfig(model="sasrec").resolved())
    assert training.resume_conflicts(dict(sasrec, num_blocks=3), sasrec) == [
        "num_blocks is 3 in the checkpoint, 2 now"]



def test_resume_of_a_stosa_checkpoint_with_length_buckets():
    """A checkpoint trained with length buckets (STOSA's default before packed rows) resumes
    only with its bucket: the batch widths it trained with; one of maxlen or more never trims,
    the same as None."""
    new = dataclasses.asdict(training.TrainConfig(model="stosa").resolved())
    assert new["length_bucket"] is None and new["maxlen"] == 100 and new["pack_rows"] is True
    older = dict(new, length_bucket=10)
    (why,) = training.resume_conflicts(older, new)
    assert why == "length_bucket is 10 in the checkpoint, None now"
    assert training.resume_conflicts(older, dict(new, length_bucket=10)) == []
    assert training.resume_conflicts(dict(new, length_bucket=100), new) == []


@pytest.mark.parametrize("model", ["sasrec", "bert4rec", "stosa"])
def test_a_checkpoint_from_before_packed_rows_resumes_packed(model):
    """``pack_rows`` changes the batch layout and the dropout draws, not the model or the
    loss: a run may resume with or without it (RESUME_HARMLESS)."""
    new = dataclasses.asdict(training.TrainConfig(model=model).resolved())
    older = {k: v for k, v in new.items() if k != "pack_rows"}
    assert training.resume_conflicts(older, new) == []
    assert training.resume_conflicts(new, dict(new, pack_rows=False)) == []


def test_pack_rows_needs_a_transformer_model(capsys, tmp_path):
    _fails(capsys, ["--model", "gru4rec", "--no-pack-rows", "--out", tmp_path / "o"],
           "--pack-rows applies to sasrec, bert4rec and stosa only; gru4rec does not use it")
    assert not (tmp_path / "o").exists()


# ---- item 8: errors name their subject ---------------------------------------------------------


def test_a_corrupt_checkpoint_is_named(capsys, tmp_path, tiny_csv):
    base = ["--data", tiny_csv, *TINY, "--out", tmp_path / "o"]
    assert _run(capsys, *base, "--epochs", "1")[0] == 0
    step = tmp_path / "o" / "checkpoints" / "1"
    damaged = max((p for p in step.rglob("*") if p.is_file() and "meta" not in p.parts),
                  key=lambda p: p.stat().st_size)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    _fails(capsys, base + ["--epochs", "2", "--resume"], f"checkpoint {step} is corrupt: ")


def test_data_errors_name_the_file(capsys, tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf1 1 2 3\n2 2 3 4\n")
    code, out, _ = _run(capsys, "--data", bom, "--data-stats")
    assert code == 0 and json.loads(out)["users"] == 2
    big = tmp_path / "big.txt"
    big.write_text("1 1 2 3\n2 2 18446744073709551616 4\n")
    _fails(capsys, ["--data", big, "--data-stats"], "big.txt:2: id '18446744073709551616' is out "
           "of range")
    ratings = tmp_path / "u1.base"
    ratings.write_text("1\t2\t5\t881250949\n1\t3\t4\t881250950\n")
    _fails(capsys, ["--data", ratings, "--format", "seqtxt", "--data-stats"], "u1.base:1: found "
           "tab-separated user, item, rating, timestamp")
    helpers.fails_cleanly(capsys, ["--data", str(tmp_path / "none.txt")], "none.txt: not found")
    bad = tmp_path / "bad.txt"
    bad.write_text("1 1 2 3\n2 x\n")
    _fails(capsys, ["--data", bad, "--out", tmp_path / "o", *TINY], "bad.txt:2: id 'x'")
    assert not (tmp_path / "o").exists()
