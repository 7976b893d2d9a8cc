"""Tests for sevo_jax.data: loaders, filtering, the leave-one-out split, caching, errors."""

import gzip
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from sevo_jax import data
from sevo_jax.data import DataError, SequenceDataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BEAUTY = DATA / "amazon-beauty" / "Beauty.txt"
ML100K = DATA / "ml-100k"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    return path


@pytest.fixture(scope="module")
def beauty() -> SequenceDataset:
    return data.load_seqtxt(_need(BEAUTY))


@pytest.fixture(scope="module")
def ml100k() -> SequenceDataset:
    return data.load_movielens(_need(ML100K))


@pytest.fixture(scope="module")
def synth() -> SequenceDataset:
    return data.synthetic()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _all_interactions(ds: SequenceDataset) -> tuple[np.ndarray, np.ndarray]:
    users, items = ds.train_pairs()
    every = np.arange(ds.num_users, dtype=np.int32)
    return np.concatenate([users, every, every]), np.concatenate([items, ds.valid, ds.test])


def _full_sequences(ds: SequenceDataset) -> list[list[int]]:
    return [
        [*seq.tolist(), int(v), int(t)]
        for seq, v, t in zip(ds.train_sequences(), ds.valid, ds.test)
    ]


def _check_invariants(ds: SequenceDataset) -> None:
    assert ds.train_items.dtype == np.int32 and ds.train_offsets.dtype == np.int64
    assert ds.valid.dtype == np.int32 and ds.test.dtype == np.int32
    assert ds.train_offsets.shape == (ds.num_users + 1,) and ds.train_offsets[0] == 0
    assert ds.train_offsets[-1] == ds.train_items.size
    assert (ds.train_lengths() >= 1).all()
    _, items = _all_interactions(ds)
    assert items.min() >= 1 and items.max() <= ds.num_items  # padding 0 never used
    assert np.unique(items).size == ds.num_items  # every item id occurs


# -- real data ---------------------------------------------------------------------------


def test_beauty_counts_and_ids(beauty):
    assert beauty.name == "Beauty"
    assert beauty.stats()["users"] == 22363
    assert beauty.stats()["items"] == 12101
    assert beauty.stats()["interactions"] == 198502
    _check_invariants(beauty)
    # The file's first line is "1 1 2 3 4 5": contiguous ids are kept as they are.
    first = BEAUTY.read_text().split("\n", 1)[0].split()
    assert _full_sequences(beauty)[0] == [int(x) for x in first[1:]]


def test_ml100k_counts_genres_and_time_order(ml100k):
    assert (ml100k.num_users, ml100k.num_items) == (943, 1682)
    assert ml100k.stats()["interactions"] == 100000
    _check_invariants(ml100k)
    assert len(ml100k.category_names) == 19 and ml100k.item_categories.shape == (1683, 19)
    assert ml100k.item_categories[0].nnz == 0
    toy_story = ml100k.item_categories[1].indices
    assert {ml100k.category_names[j] for j in toy_story} == {"Animation", "Children's", "Comedy"}

    # Reference order: Python's stable sort by timestamp, ties in file order.
    ratings = defaultdict(list)
    for line in (ML100K / "u.data").read_text().splitlines():
        user, item, _, ts = map(int, line.split("\t"))
        ratings[user].append((ts, item))
    by_time = {u: sorted(rows, key=lambda r: r[0]) for u, rows in ratings.items()}
    expected = [[item for _, item in by_time[u]] for u in sorted(by_time)]
    assert _full_sequences(ml100k) == expected


def test_movielens_accepts_the_ratings_file(ml100k):
    assert data.load_movielens(ML100K / "u.data") == ml100k


# -- builder: split, remapping, filtering --------------------------------------------------


def test_split_is_chronological_with_stable_ties(tmp_path):
    path = _write(
        tmp_path / "log.csv",
        "user,item,timestamp\n"
        "bob,z,5\nalice,x,3\nbob,y,1\nalice,w,3\nalice,v,1\nbob,x,5\nalice,z,2\ncarol,x,1\n",
    )
    ds = data.load_csv(path)
    assert ds.name == "log" and (ds.num_users, ds.num_items) == (2, 5)  # carol is too short
    # Items sorted by raw id: v=1, w=2, x=3, y=4, z=5; users: alice=0, bob=1.
    assert _full_sequences(ds) == [[1, 5, 3, 2], [4, 5, 3]]
    assert ds.valid.tolist() == [3, 5] and ds.test.tolist() == [2, 3]
    assert [s.tolist() for s in ds.train_sequences()] == [[1, 5], [4]]
    _check_invariants(ds)


def test_csv_without_header_and_integer_ids(tmp_path):
    path = _write(tmp_path / "log.csv", "10,9,1\n10,10,2\n10,100,3\n2,9,1.5\n2,10,0.5\n2,9,9\n")
    ds = data.load_csv(path)
    # Integer ids are ordered numerically (9 < 10 < 100), not as strings.
    assert _full_sequences(ds) == [[2, 1, 1], [1, 2, 3]]


def test_seqtxt_remaps_sorted_raw_ids(tmp_path):
    path = _write(tmp_path / "seq.txt", "7 30 10 20\n\n3 20 20 40 10\n9 5 6\n")
    ds = data.load_seqtxt(path)
    assert ds.num_users == 2 and ds.num_items == 4  # user 9 is too short; items 10,20,30,40
    assert _full_sequences(ds) == [[2, 2, 4, 1], [3, 1, 2]]


def test_train_pairs_and_seen_items(synth):
    users, items = synth.train_pairs()
    assert users.dtype == np.int32 and users.size == items.size == synth.train_items.size
    for u in (0, 17, synth.num_users - 1):
        assert items[users == u].tolist() == synth.train_sequences()[u].tolist()
    seen_valid, seen_test = synth.seen_items("valid"), synth.seen_items("test")
    assert seen_valid.shape == (synth.num_users, synth.num_items + 1)
    for u in (0, 17):
        assert set(seen_valid[u].indices) == set(synth.train_sequences()[u].tolist())
        assert set(seen_test[u].indices) == set(seen_valid[u].indices) | {int(synth.valid[u])}
    assert seen_valid[:, 0].nnz == 0
    with pytest.raises(ValueError, match="split"):
        synth.seen_items("train")


@pytest.mark.parametrize("k", [5, 10])
def test_kcore_leaves_k_interactions_everywhere(k):
    ds = data.load_movielens(_need(ML100K), kcore=k) if k == 10 else data.synthetic(kcore=k)
    users, items = _all_interactions(ds)
    assert np.bincount(users).min() >= k
    assert np.bincount(items, minlength=ds.num_items + 1)[1:].min() >= k
    _check_invariants(ds)


def test_kcore_iterates_until_stable(tmp_path):
    # Dropping item 9 (2 uses) leaves user 2 with 2 items, which then drops item 5 below 3.
    path = _write(tmp_path / "s.txt", "1 1 2 3 4\n2 9 5 9 6\n3 1 2 3 5 4 6\n4 1 2 3 4 5 6\n")
    ds = data.load_seqtxt(path, kcore=3)
    assert ds.num_users == 3 and ds.num_items == 4  # items 1,2,3,4 survive
    users, items = _all_interactions(ds)
    assert np.bincount(users).min() >= 3 and np.bincount(items)[1:].min() >= 3


def test_no_user_left_is_an_error(tmp_path):
    path = _write(tmp_path / "tiny.txt", "1 1 2\n2 3 4\n")
    with pytest.raises(DataError, match=r"tiny\.txt: no user left"):
        data.load_seqtxt(path)


def test_min_len_below_three_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="min_len"):
        data.load_seqtxt(_write(tmp_path / "s.txt", "1 1 2 3\n"), min_len=2)


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text, line, pattern",
    [
        ("bad.txt", "1 1 2 3\n\n2 4 x 6\n", 3, "'x' is not an integer"),
        ("bad.txt", "1 1 2 3\n2\n", 2, "user id followed by item ids"),
        ("u.data", "1\t2\t5\t100\n1\t3\t4\n", 2, "expected 4"),
        ("u.data", "1\t2\t5\t100\n\n1\t3.5\t4\t7\n", 3, "item id '3.5' is not an integer"),
        ("u.data", "1\t2\t5\t100\n1\t3\t4\tlate\n", 2, "timestamp 'late' is not a finite number"),
        ("ratings.dat", "1::2::5::100\n1::3::4::nan\n", 2, "timestamp 'nan'"),
        ("log.csv", "u,i,t\na,b,1\na,b\n", 3, "expected 3"),
        ("log.csv", "a,b,1\na,c,x\n", 2, "timestamp 'x'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, name, text, line, pattern):
    path = _write(tmp_path / name, text)
    loader = {"bad.txt": data.load_seqtxt, "log.csv": data.load_csv}.get(name, data.load_movielens)
    with pytest.raises(DataError, match=pattern) as info:
        loader(path)
    message = str(info.value)
    assert "\n" not in message and f"{name}:{line}:" in message


def test_missing_and_empty_files(tmp_path):
    for loader in (data.load_seqtxt, data.load_movielens, data.load_csv):
        with pytest.raises(DataError, match=r"nowhere\.txt: not found"):
            loader(tmp_path / "nowhere.txt")
    with pytest.raises(DataError, match=r"no u\.data or ratings\.dat"):
        data.load_movielens(tmp_path)
    empty = _write(tmp_path / "empty.txt", "\n  \n")
    with pytest.raises(DataError, match=r"empty\.txt: file is empty"):
        data.load_seqtxt(empty)
    with pytest.raises(DataError, match=r"head\.csv: file is empty"):
        data.load_csv(_write(tmp_path / "head.csv", "user,item,timestamp\n"))
    with pytest.raises(DataError, match="not found"):
        data.load_dataset("seqtxt", tmp_path / "nowhere.txt")


def test_binary_compressed_and_long_tokens_are_one_short_line(tmp_path):
    for name, blob, pattern in (
            ("beauty.txt.gz", gzip.compress(b"1 2 3 4\n"), r"beauty\.txt\.gz: a gzip-compressed "
                                                          r"file; decompress it first"),
            ("model.bin", b"1 2 3 4\n5 6\x00\x01 7\n", r"model\.bin:2: binary data \(a NUL byte\)")):
        path = tmp_path / name
        path.write_bytes(blob)
        for load in (data.detect_format, data.load_seqtxt, data.load_csv,
                     data.load_movielens):
            with pytest.raises(DataError, match=pattern):
                load(path)
    long = _write(tmp_path / "long.txt", "1 2 3 4\n" + "2 " + "x" * 5000 + " 3\n")
    with pytest.raises(DataError) as info:
        data.load_seqtxt(long)
    message = str(info.value)
    assert message.endswith("...' is not an integer") and "long.txt:2: id 'xxx" in message
    assert len(message) - len(str(long)) < 100


def test_unknown_format():
    with pytest.raises(DataError, match=r"unknown format 'parquet'; expected one of seqtxt"):
        data.load_dataset("parquet", "x.parquet")


# -- caching -----------------------------------------------------------------------------


def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path):
    src = _write(tmp_path / "seq.txt", "1 1 2 3 4\n2 2 3 4\n")
    (tmp_path / "f").write_text("")
    with pytest.raises(DataError, match=r"cache folder \S+/f/sub cannot be written \(Not a dir"):
        data.load_dataset("seqtxt", src, cache_dir=tmp_path / "f" / "sub")


def test_cache_is_used_on_the_second_call(tmp_path, monkeypatch):
    src = _write(tmp_path / "seq.txt", "1 1 2 3 4\n2 2 3 4\n3 4 3 2 1\n")
    cache = tmp_path / "cache"
    first = data.load_dataset("seqtxt", src, cache_dir=cache)
    files = list(cache.glob("seq-*.npz"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("parsed again instead of reading the cache")

    monkeypatch.setattr(data, "load_seqtxt", fail)
    assert data.load_dataset("seqtxt", src, cache_dir=cache) == first
    with pytest.raises(AssertionError, match="parsed again"):  # other filters: other cache key
        data.load_dataset("seqtxt", src, cache_dir=cache, min_len=4)
    monkeypatch.undo()

    _write(src, "1 1 2 3 4\n2 2 3 4 5\n")  # a changed file is parsed again
    changed = data.load_dataset("seqtxt", src, cache_dir=cache)
    assert changed != first and changed.num_items == 5
    assert len(list(cache.glob("seq-*.npz"))) == 2


def test_a_file_rewritten_with_its_old_size_and_mtime_is_parsed_again(tmp_path):
    """``cp -p`` of another file of the same size: size and mtime match the cache entry's,
    the inode's change time does not."""
    import os

    src = _write(tmp_path / "seq.txt", "1 1 2 3 4\n2 2 3 4\n3 4 3 2 1\n")
    cache = tmp_path / "cache"
    first = data.load_dataset("seqtxt", src, cache_dir=cache)
    stat = src.stat()
    time.sleep(0.01)
    src.write_text("1 1 2 3 4\n2 2 3 4\n3 4 3 2 5\n")   # same size, item 5 is new
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert src.stat().st_size == stat.st_size and src.stat().st_mtime_ns == stat.st_mtime_ns
    again = data.load_dataset("seqtxt", src, cache_dir=cache)
    assert again != first and again.num_items == 5


def test_a_cache_entry_with_bad_ids_is_rebuilt(tmp_path):
    """A cache file whose arrays a SequenceDataset refuses (ids out of range, floats) is
    parsed again from the source, not read and not a traceback."""
    src = _write(tmp_path / "seq.txt", "1 1 2 3 4\n2 2 3 4\n3 4 3 2 1\n")
    cache = tmp_path / "cache"
    first = data.load_dataset("seqtxt", src, cache_dir=cache)
    [entry] = cache.glob("seq-*.npz")
    with np.load(entry) as z:
        arrays = dict(z)
    for bad in ({"test": arrays["test"] + 100}, {"valid": arrays["valid"].astype(float)}):
        with open(entry, "wb") as f:
            np.savez(f, **{**arrays, **bad})
        assert data.load_dataset("seqtxt", src, cache_dir=cache) == first


def test_movielens_cache_follows_the_genre_file_beside_a_ratings_file(tmp_path):
    ml = tmp_path / "ml"
    ml.mkdir()
    ratings = _write(ml / "ratings.dat", "".join(
        f"{u}::{i}::5::{t}\n" for u in (1, 2) for t, i in enumerate((1, 2, 1, 2, 1), 1)))
    _write(ml / "movies.dat", "1::A (1990)::Drama\n2::B (1991)::Comedy\n")
    cache = ml / "cache"  # inside the data folder: not part of the inputs
    first = data.load_dataset("movielens", ratings, cache_dir=cache)
    assert first.category_names == ("Comedy", "Drama")
    assert data.load_dataset("movielens", ml, cache_dir=cache) == data.load_dataset(
        "movielens", ml, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2  # one per path spelling, each hit again
    time.sleep(0.01)
    _write(ml / "movies.dat", "1::A (1990)::Horror\n2::B (1991)::War\n")
    assert data.load_dataset("movielens", ratings, cache_dir=cache).category_names == (
        "Horror", "War")


def test_lone_carriage_returns_end_lines(tmp_path):
    path = tmp_path / "cr.txt"
    path.write_bytes(b"1 2 3 4\r5 6 7 8\r9 2 6 3\r")
    ds = data.load_dataset("seqtxt", path)
    assert ds.num_users == 3 and data.detect_format(path) == "seqtxt"


def test_nanosecond_timestamps_keep_their_order(tmp_path):
    base = 1_600_000_000_000_000_000  # > 2^53: float64 would make these equal
    rows = [("1", "a", 3), ("1", "b", 2), ("1", "c", 1), ("1", "d", 0), ("1", "a", 4)]
    path = _write(tmp_path / "ns.csv", "".join(f"{u},{i},{base + t}\n" for u, i, t in rows))
    ds = data.load_dataset("csv", path)
    small = data.load_dataset("csv", _write(tmp_path / "s.csv", "".join(
        f"{u},{i},{t}\n" for u, i, t in rows)))
    assert ds.stats()["duplicates_dropped"] == 0  # ("1", "a") at two distinct times
    assert ds.fingerprint() == small.fingerprint()  # the same ids, sequences and targets


def test_cache_for_real_movielens(tmp_path, ml100k):
    _need(ML100K)
    first = data.load_dataset("movielens", ML100K, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("ml-100k-*.npz")
    again = data.load_dataset("movielens", ML100K, cache_dir=tmp_path)
    assert first == again == ml100k and again.category_names == ml100k.category_names
    assert list(tmp_path.glob("ml-100k-*.npz")) == [cached]


# -- synthetic ---------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_cheap():
    start = time.perf_counter()
    a = data.synthetic(seed=3)
    assert time.perf_counter() - start < 1.0
    assert a == data.synthetic(seed=3)
    assert a != data.synthetic(seed=4)
    assert data.load_dataset("synthetic", None, num_users=300, seed=3) == data.synthetic(
        num_users=300, seed=3
    )


def test_synthetic_has_planted_cluster_structure(synth):
    _check_invariants(synth)
    assert synth.num_users == 1000 and 990 <= synth.num_items <= 1000  # unseen items are dropped
    lengths = np.array([len(s) for s in _full_sequences(synth)])
    assert lengths.min() >= 8 and lengths.max() <= 30
    cats = synth.item_categories
    assert cats.shape == (synth.num_items + 1, 25) and cats[0].nnz == 0
    assert (np.diff(cats.indptr)[1:] == 1).all()  # one cluster per item
    cluster = np.concatenate([[-1], cats.indices])  # cluster of item i is cluster[i]
    seqs = map(np.array, _full_sequences(synth))
    same = [np.mean(cluster[s[1:]] == cluster[s[:-1]]) for s in seqs]
    assert np.mean(same) > 0.6  # chance level is 1/25
    popularity = np.sort(np.bincount(_all_interactions(synth)[1]))[::-1]
    assert popularity[:50].sum() > 2 * popularity[-50:].sum()  # skewed, Zipf-like


# -- persistence -------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, synth):
    path = tmp_path / "synth.npz"
    synth.save(path)
    loaded = SequenceDataset.load(path)
    assert loaded == synth and loaded.category_names == synth.category_names
    assert loaded.train_items.dtype == np.int32 and loaded.item_categories.dtype == np.float32

    plain = data.load_seqtxt(_write(tmp_path / "s.txt", "1 1 2 3\n2 3 2 1 4\n"))
    plain.save(tmp_path / "plain.npz")
    again = SequenceDataset.load(tmp_path / "plain.npz")
    assert again == plain and again.item_categories is None and again.category_names is None


# -- formats are told apart by content (issue 12, item 1) ----------------------------------

RATINGS_LINES = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t1\t878887116\n"


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("u1.base", RATINGS_LINES, "movielens"),  # ML-100K's own split files
        ("ratings.txt", RATINGS_LINES, "movielens"),  # a renamed u.data
        ("log.csv", RATINGS_LINES, "movielens"),  # the name says csv, the content does not
        ("ratings.dat", "1::1193::5::978300760\n", "movielens"),
        ("renamed.txt", "1::1193::5::978300760\n", "movielens"),
        ("log.txt", "user,item,timestamp\na,b,1\n", "csv"),
        ("seq.csv", "1 1 2 3\n2 3 4 5\n", "seqtxt"),
        ("seq.txt", "\ufeff1 1 2 3\n", "seqtxt"),
        ("tabs.txt", "1\t1\t2\n2\t3\t4\t5\n", "seqtxt"),  # tabs, but not 4 fields first
    ],
)
def test_detect_format_reads_the_content_not_the_name(tmp_path, name, text, expected):
    assert data.detect_format(_write(tmp_path / name, text)) == expected


@pytest.mark.parametrize("text", [
    "1 6 1600000000\n1 7 1600000100\n2 6 1600000200\n",      # user item timestamp
    "1\t6\t1600000000\n2\t7\t1600000100\n",                  # the same with tabs
    "1 10 1 880756250\n1 11 3 880756300\n",                  # u.data written with spaces
])
def test_timed_rows_are_not_read_as_sequences(tmp_path, text):
    """Read as sequences, every timestamp became an item id, silently."""
    with pytest.raises(DataError, match=r"looks like a whitespace-separated 'user item \[rating\] "
                                        r"timestamp' row.*--format seqtxt"):
        data.detect_format(_write(tmp_path / "log.txt", text))


def test_detect_format_of_a_directory_and_a_missing_file(tmp_path):
    assert data.detect_format(tmp_path) == "movielens"
    with pytest.raises(DataError, match=r"nowhere\.txt: not found"):
        data.detect_format(tmp_path / "nowhere.txt")


def test_ml100k_split_file_loads_as_movielens(tmp_path):
    text = RATINGS_LINES + "196\t51\t2\t881250950\n196\t51\t2\t881250950\n"  # one duplicate
    path = _write(tmp_path / "u1.base", text)
    ds = data.load_dataset(data.detect_format(path), path)
    # user 196 rated 377, 242, 51 in time order (ids 3, 2, 1); user 186 (one rating) is too short
    assert _full_sequences(ds) == [[3, 2, 1]] and ds.num_items == 3
    assert ds.stats()["duplicates_dropped"] == 1 and ds.stats()["users_dropped"] == 1


def test_seqtxt_refuses_a_ratings_file(tmp_path):
    path = _write(tmp_path / "u.data", RATINGS_LINES)
    with pytest.raises(DataError) as info:
        data.load_seqtxt(path)
    message = str(info.value)
    assert "\n" not in message and "u.data:1:" in message
    assert "user, item, rating, timestamp" in message and "--format movielens" in message


@pytest.mark.parametrize("line, hint", [("1::2::5::100", "movielens"), ("1,2,3", "csv")])
def test_seqtxt_names_the_format_of_a_foreign_line(tmp_path, line, hint):
    path = _write(tmp_path / "seq.txt", f"1 1 2 3\n{line}\n")
    with pytest.raises(DataError, match=rf"seq\.txt:2: .*--format {hint}"):
        data.load_seqtxt(path)


def test_csv_first_row_with_nan_timestamp_is_an_error_not_a_header(tmp_path):
    path = _write(tmp_path / "log.csv", "1,2,nan\n1,3,2\n1,4,3\n")
    with pytest.raises(DataError, match=r"log\.csv:1: timestamp 'nan' is not a finite number"):
        data.load_csv(path)
    header = _write(tmp_path / "head.csv", "user,item,timestamp\n1,2,1\n1,3,2\n1,4,3\n")
    assert data.load_csv(header).stats()["interactions"] == 3


# -- duplicates (item 2) --------------------------------------------------------------------


def _rows_csv(rows) -> str:
    return "".join(f"{u},{i},{t}\n" for u, i, t in rows)


def test_exact_duplicates_are_dropped_counted_and_cannot_leak_a_target(tmp_path):
    rows = [(u, (u * 7 + k) % 30, k) for u in range(12) for k in range(6)]
    once = data.load_csv(_write(tmp_path / "once.csv", _rows_csv(rows)))
    doubled = _write(tmp_path / "twice.csv", _rows_csv([r for r in rows for _ in range(2)]))
    ds = data.load_csv(doubled)
    assert ds.fingerprint() == once.fingerprint()  # the same split, names aside
    assert ds.duplicates_dropped == len(rows) and once.duplicates_dropped == 0
    assert ds.stats()["duplicates_dropped"] == len(rows)
    # no target is the item just seen (the rows of a user are all distinct items)
    last_train = ds.train_items[ds.train_offsets[1:] - 1]
    assert not (ds.valid == last_train).any() and not (ds.test == ds.valid).any()

    kept = data.load_csv(doubled, keep_duplicates=True)
    assert kept.duplicates_dropped == 0 and kept.stats()["interactions"] == 2 * len(rows)
    assert (kept.test == kept.valid).all()  # what keeping them costs: the target leaks


def test_same_item_at_another_time_is_a_repeat_not_a_duplicate(tmp_path):
    path = _write(tmp_path / "log.csv", "1,5,1\n1,6,2\n1,5,3\n1,5,3\n")
    ds = data.load_csv(path)
    assert ds.duplicates_dropped == 1 and _full_sequences(ds) == [[1, 2, 1]]


def test_movielens_duplicates_and_short_users_are_counted(tmp_path):
    text = "1\t10\t5\t1\n1\t11\t4\t2\n1\t12\t3\t3\n1\t12\t3\t3\n2\t10\t5\t1\n3\t10\t1\t5\n"
    ds = data.load_movielens(_write(tmp_path / "u.data", text))
    assert ds.stats()["duplicates_dropped"] == 1 and ds.stats()["users_dropped"] == 2
    assert ds.num_users == 1 and ds.num_items == 3


def test_duplicate_policy_is_part_of_the_cache_key(tmp_path):
    src = _write(tmp_path / "log.csv", "1,1,1\n1,1,1\n1,2,2\n1,3,3\n1,4,4\n")
    cache = tmp_path / "cache"
    dropped = data.load_dataset("csv", src, cache_dir=cache)
    kept = data.load_dataset("csv", src, cache_dir=cache, keep_duplicates=True)
    assert dropped.duplicates_dropped == 1 and kept.duplicates_dropped == 0
    again = data.load_dataset("csv", src, cache_dir=cache)  # read back from the cache
    assert again == dropped and again.duplicates_dropped == 1 and again.users_dropped == 0
    assert len(list(cache.glob("log-*.npz"))) == 2


def test_fingerprint_follows_the_content_not_the_path(tmp_path):
    a = data.load_seqtxt(_write(tmp_path / "a.txt", "1 1 2 3 4\n2 2 3 4\n"))
    b = data.load_seqtxt(_write(tmp_path / "b.txt", "1 1 2 3 4\n\n2 2 3 4\n"))
    c = data.load_seqtxt(_write(tmp_path / "c.txt", "1 1 2 3 4\n2 2 4 3\n"))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert data.synthetic(num_users=50).fingerprint() != data.synthetic(
        num_users=50, seed=1).fingerprint()


# -- errors name their subject (item 8) ----------------------------------------------------


def test_bom_at_the_top_of_a_sequence_file_is_stripped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf1 1 2 3\n2 2 3 4\n")
    plain = data.load_seqtxt(_write(tmp_path / "plain.txt", "1 1 2 3\n2 2 3 4\n"))
    assert data.load_seqtxt(path).fingerprint() == plain.fingerprint()
    ratings = tmp_path / "u.data"
    ratings.write_bytes(b"\xef\xbb\xbf1\t1\t5\t1\n1\t2\t5\t2\n1\t3\t5\t3\n")
    assert data.load_movielens(ratings).num_users == 1


def test_id_beyond_int64_says_out_of_range(tmp_path):
    path = _write(tmp_path / "big.txt", "1 1 2 3\n2 2 99999999999999999999 4\n")
    with pytest.raises(DataError, match=r"big\.txt:2: id '99999999999999999999' is out of range"):
        data.load_seqtxt(path)
    ratings = _write(tmp_path / "u.data", "1\t1\t5\t1\n1\t-99999999999999999999\t5\t2\n")
    with pytest.raises(DataError, match=r"u\.data:2: item id .* is out of range"):
        data.load_movielens(ratings)


def test_no_user_left_says_why(tmp_path):
    path = _write(tmp_path / "short.csv", "1,1,1\n1,1,1\n1,2,2\n")
    with pytest.raises(DataError, match=r"short\.csv: no user left .*fewer than 3.*1 duplicates"):
        data.load_csv(path)


def test_movielens_separator_comes_from_the_first_non_blank_line(tmp_path):
    # found by tests/test_data_properties.py: a blank first line made '::' files tab-separated
    path = _write(tmp_path / "ratings.dat", "   \n1::1::3::0\n1::2::3::1\n1::3::3::2\n")
    assert data.load_movielens(path).stats()["interactions"] == 3


def test_csv_header_is_a_row_without_any_number(tmp_path):
    # '1,2,x' is a data row with a bad timestamp, not a header to skip
    with pytest.raises(DataError, match=r"log\.csv:1: timestamp 'x' is not a finite number"):
        data.load_csv(_write(tmp_path / "log.csv", "1,2,x\n1,3,2\n1,4,3\n1,5,4\n"))
    ds = data.load_csv(_write(tmp_path / "named.csv", "user_id,item_id,ts\n1,3,2\n1,4,3\n1,5,4\n"))
    assert ds.stats()["interactions"] == 3


def test_csv_header_naming_ratings_is_refused_not_taken_as_times(tmp_path):
    """A ratings file (``userId,movieId,rating``) would order each user's items by rating:
    its header names it, and that is one line, not a data set."""
    body = "1,10,4.5\n1,11,3.0\n1,12,5.0\n1,13,1.0\n"
    for name in ("rating", "Rating", "score", "stars"):
        path = _write(tmp_path / f"{name}.csv", f"userId,movieId,{name}\n" + body)
        with pytest.raises(DataError, match=rf":1: the third column is '{name}', not a time"):
            data.load_csv(path)
    for name in ("timestamp", "start_time", "Time"):
        ok = data.load_csv(_write(tmp_path / "time.csv", f"userId,movieId,{name}\n" + body))
        assert ok.stats()["interactions"] == 4


@pytest.mark.parametrize("header, order", [
    ("timestamp,user,item", (2, 0, 1)), ("item,user,timestamp", (1, 0, 2)),
    ("movieId,userId,unix_time", (1, 0, 2)), ("user_id,business_id,date", (0, 1, 2))])
def test_csv_columns_are_read_by_their_header_names(tmp_path, header, order):
    """Before, the header was skipped and the columns read as user,item,timestamp."""
    rows = [(u, (3 * u + 5 * k) % 11 + 1, 1000 + k) for u in range(1, 7) for k in range(5)]
    (tmp_path / "ref").mkdir()
    reference = data.load_csv(_write(tmp_path / "ref" / "log.csv", "".join(
        f"{u},{i},{t}\n" for u, i, t in rows)))
    text = header + "\n" + "".join(",".join(str((u, i, t)[j]) for j in order) + "\n"
                                   for u, i, t in rows)
    assert data.load_csv(_write(tmp_path / "log.csv", text)) == reference


def test_csv_ids_are_stripped_and_missing_ids_refused(tmp_path):
    plain = "".join(f"u{u},i{(u + k) % 7},{k}\n" for u in range(6) for k in range(5))
    spaced = "".join(f"u{u}, i{(u + k) % 7} ,{k}\n" for u in range(6) for k in range(5))
    (tmp_path / "b").mkdir()
    assert data.load_csv(_write(tmp_path / "a.csv", plain)) == data.load_csv(
        _write(tmp_path / "b" / "a.csv", spaced))
    for bad, what in (("u1,,9\n", "missing item id"), (",i1,9\n", "missing user id"),
                      ("u1,NA,9\n", "missing item id \\('NA'\\)")):
        with pytest.raises(DataError, match=r"c\.csv:31: " + what):
            data.load_csv(_write(tmp_path / "c.csv", plain + bad))


@pytest.mark.parametrize("change, needle", [
    (dict(train_items=[1, 6, 3]), "train_items holds item ids outside 1..num_items = 5"),
    (dict(valid=[0, 5]), "valid holds item ids outside"),
    (dict(test=[5, -1]), "test holds item ids outside"),
    (dict(train_items=np.array([1, 2, 2**40])), "outside 1..num_items"),  # not wrapped to int32
    (dict(train_items=[1.5, 2.0, 3.0]), "train_items must hold integers"),  # not truncated
    (dict(train_offsets=[0, 4, 3]), "non-decreasing"),
    (dict(num_items=5.0), "num_items must be an integer"),
    (dict(num_users=True), "num_users must be an integer"),
    (dict(num_items=2**40), "num_items must be an integer in"),
])
def test_sequence_dataset_refuses_ids_it_would_misread(change, needle):
    ok = dict(name="t", num_users=2, num_items=5, train_items=[1, 2, 3],
              train_offsets=[0, 2, 3], valid=[4, 5], test=[5, 1])
    assert SequenceDataset(**ok).num_items == 5
    with pytest.raises((ValueError, TypeError), match=needle):
        SequenceDataset(**{**ok, **change})
