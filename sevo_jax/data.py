"""Sequential-recommendation data sets: loaders, filtering and the leave-one-out split.

Every loader parses its raw format into flat ``(user, item, time)`` arrays and hands them to
one shared builder, which

0. drops exact duplicate ``(user, item, time)`` rows (``keep_duplicates=False``, the default;
   a duplicated interaction would make a validation or test target the item just seen),
1. optionally applies an iterative k-core filter (users and items with fewer than ``kcore``
   interactions are dropped until none is left),
2. drops users with fewer than ``min_len`` interactions (leave-one-out needs >= 3),
3. remaps users to ``0..U-1`` and items to ``1..I`` in sorted raw-id order (0 is the padding
   id; files whose item ids are already ``1..N`` keep them), and
4. orders each user's interactions by time (ties keep file order) and splits them: the last
   item is the test target, the second last the validation target, the rest is training data.

How many duplicate rows and users were dropped is kept on the data set (``stats()``).
``detect_format`` tells the formats apart by content, never by file name alone, and every
loader refuses content that belongs to another format.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "DataError",
    "SequenceDataset",
    "load_seqtxt",
    "load_movielens",
    "load_csv",
    "synthetic",
    "load_dataset",
    "detect_format",
    "FORMATS",
]

FORMATS = ("seqtxt", "movielens", "csv", "synthetic")
_CACHE_VERSION = 2

PathLike = str | os.PathLike


class DataError(ValueError):
    """A data file is missing or malformed; the message is one line naming the file."""


# --------------------------------------------------------------------------------------
# The data set container
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class SequenceDataset:
    """Per-user item sequences after a chronological leave-one-out split.

    Items are ``1..num_items`` (0 is padding). User ``u``'s training items, in time order, are
    ``train_items[train_offsets[u]:train_offsets[u + 1]]`` (at least one); ``valid[u]`` and
    ``test[u]`` are the user's second-last and last items. ``item_categories`` is an optional
    ``(num_items + 1, num_categories)`` float32 0/1 CSR incidence matrix with an empty row 0.
    ``duplicates_dropped`` counts the exact duplicate rows the loader dropped and
    ``users_dropped`` the users it dropped for having too few interactions (``min_len``, k-core).
    """

    name: str
    num_users: int
    num_items: int
    train_items: np.ndarray
    train_offsets: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    item_categories: sp.csr_matrix | None = None
    category_names: tuple[str, ...] | None = None
    duplicates_dropped: int = 0
    users_dropped: int = 0

    def __post_init__(self):
        for size in ("num_users", "num_items"):  # ids are stored as int32
            value = getattr(self, size)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
                    or not 0 <= value < 2**31 - 1:
                raise ValueError(f"{size} must be an integer in [0, 2^31 - 1), got {value!r}")
            object.__setattr__(self, size, int(value))
        coerce = {
            "train_items": np.int32,
            "train_offsets": np.int64,
            "valid": np.int32,
            "test": np.int32,
        }
        for field, dtype in coerce.items():
            values = np.asarray(getattr(self, field))
            if values.size and values.dtype.kind not in "iu":
                raise TypeError(f"{field} must hold integers, got dtype {values.dtype}")
            if field != "train_offsets" and values.size and (
                    values.min() < 1 or values.max() > self.num_items):
                raise ValueError(f"{field} holds item ids outside 1..num_items = "
                                 f"{self.num_items}: {values.min()}..{values.max()}")
            object.__setattr__(self, field, np.ascontiguousarray(values, dtype))
        object.__setattr__(self, "duplicates_dropped", int(self.duplicates_dropped))
        object.__setattr__(self, "users_dropped", int(self.users_dropped))
        if self.category_names is not None:
            object.__setattr__(self, "category_names", tuple(map(str, self.category_names)))
        off = self.train_offsets
        if off.shape != (self.num_users + 1,) or off[0] != 0 or off[-1] != self.train_items.size:
            raise ValueError("train_offsets must have shape (num_users + 1,) and span train_items")
        if (np.diff(off) < 0).any():
            raise ValueError("train_offsets must be non-decreasing")
        if self.valid.shape != (self.num_users,) or self.test.shape != (self.num_users,):
            raise ValueError("valid and test must have shape (num_users,)")
        if self.item_categories is not None:
            if self.item_categories.shape[0] != self.num_items + 1:
                raise ValueError("item_categories must have num_items + 1 rows")
            names = self.category_names
            if names is not None and len(names) != self.item_categories.shape[1]:
                raise ValueError("category_names must name every column of item_categories")

    # -- views -----------------------------------------------------------------------

    def train_lengths(self) -> np.ndarray:
        """Number of training items of each user, int64 ``(num_users,)``."""
        return np.diff(self.train_offsets)

    def train_sequences(self) -> list[np.ndarray]:
        """Each user's training items in time order (views into ``train_items``)."""
        return np.split(self.train_items, self.train_offsets[1:-1])

    def train_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """``(user, item)`` int32 arrays, one entry per training interaction, grouped by user."""
        users = np.repeat(np.arange(self.num_users, dtype=np.int32), self.train_lengths())
        return users, self.train_items

    def seen_items(self, split: str) -> sp.csr_matrix:
        """Boolean ``(num_users, num_items + 1)`` CSR mask of items to exclude when ranking.

        ``"valid"``: the training items; ``"test"``: the training items plus the validation
        item. With repeat consumption the target itself may be in the mask; callers ranking a
        target should unmask it.
        """
        users, items = self.train_pairs()
        if split == "test":
            users = np.concatenate([users, np.arange(self.num_users, dtype=np.int32)])
            items = np.concatenate([items, self.valid])
        elif split != "valid":
            raise ValueError(f"unknown split {split!r}; expected 'valid' or 'test'")
        mask = sp.csr_matrix(
            (np.ones(users.size, bool), (users, items)),
            shape=(self.num_users, self.num_items + 1),
        )
        mask.sum_duplicates()
        return mask

    def stats(self) -> dict:
        """Users, items, interactions (train + valid + test), density, mean length, and the
        duplicate rows and users the loader dropped."""
        interactions = int(self.train_items.size + 2 * self.num_users)
        return {
            "users": self.num_users,
            "items": self.num_items,
            "interactions": interactions,
            "density": interactions / max(self.num_users * self.num_items, 1),
            "avg_length": interactions / max(self.num_users, 1),
            "duplicates_dropped": self.duplicates_dropped,
            "users_dropped": self.users_dropped,
        }

    def fingerprint(self) -> str:
        """Hash of the split's content (ids, sequences, targets, categories), not its name."""
        digest = hashlib.sha256(np.array([self.num_users, self.num_items], np.int64).tobytes())
        for array in (self.train_items, self.train_offsets, self.valid, self.test):
            digest.update(array.tobytes())
        if self.item_categories is not None:
            cats = self.item_categories.tocsr()
            for array in (np.array(cats.shape, np.int64), cats.indptr, cats.indices, cats.data):
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    # -- persistence -----------------------------------------------------------------

    def save(self, path: PathLike) -> None:
        """Write the data set to ``path`` (an ``.npz``, written atomically, exact name)."""
        arrays: dict[str, Any] = {
            "name": np.array(self.name),
            "num_users": np.array(self.num_users),
            "num_items": np.array(self.num_items),
            "train_items": self.train_items,
            "train_offsets": self.train_offsets,
            "valid": self.valid,
            "test": self.test,
            "duplicates_dropped": np.array(self.duplicates_dropped),
            "users_dropped": np.array(self.users_dropped),
        }
        if self.item_categories is not None:
            cats = self.item_categories.tocsr()
            arrays |= {
                "cat_indptr": cats.indptr,
                "cat_indices": cats.indices,
                "cat_data": cats.data,
                "cat_shape": np.array(cats.shape),
            }
        if self.category_names is not None:
            arrays["category_names"] = np.array(self.category_names, dtype=str)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: PathLike) -> SequenceDataset:
        """Read a data set written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            cats = None
            if "cat_indptr" in z:
                cats = sp.csr_matrix(
                    (z["cat_data"], z["cat_indices"], z["cat_indptr"]),
                    shape=tuple(z["cat_shape"]),
                )
            names = tuple(z["category_names"].tolist()) if "category_names" in z else None
            return cls(
                name=str(z["name"]),
                num_users=int(z["num_users"]),
                num_items=int(z["num_items"]),
                train_items=z["train_items"],
                train_offsets=z["train_offsets"],
                valid=z["valid"],
                test=z["test"],
                item_categories=cats,
                category_names=names,
                duplicates_dropped=int(z["duplicates_dropped"]) if "duplicates_dropped" in z else 0,
                users_dropped=int(z["users_dropped"]) if "users_dropped" in z else 0,
            )

    # -- dunder ----------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SequenceDataset):
            return NotImplemented
        if (self.name, self.num_users, self.num_items, self.category_names) != (
            other.name, other.num_users, other.num_items, other.category_names
        ):
            return False
        arrays = ("train_items", "train_offsets", "valid", "test")
        if not all(np.array_equal(getattr(self, a), getattr(other, a)) for a in arrays):
            return False
        a, b = self.item_categories, other.item_categories
        if a is None or b is None:
            return a is b
        return a.shape == b.shape and (a != b).nnz == 0

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        s = self.stats()
        cats = 0 if self.item_categories is None else self.item_categories.shape[1]
        return (
            f"SequenceDataset(name={self.name!r}, users={s['users']}, items={s['items']}, "
            f"interactions={s['interactions']}, categories={cats}, "
            f"duplicates_dropped={self.duplicates_dropped}, users_dropped={self.users_dropped})"
        )


# --------------------------------------------------------------------------------------
# The shared builder
# --------------------------------------------------------------------------------------


def _kcore_mask(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Interactions that survive the iterative k-core filter on dense codes (k <= 1: all)."""
    keep = np.ones(users.size, bool)
    if k <= 1:
        return keep
    nu, ni = int(users.max(initial=-1)) + 1, int(items.max(initial=-1)) + 1
    while True:
        user_count = np.bincount(users[keep], minlength=nu)
        item_count = np.bincount(items[keep], minlength=ni)
        new = keep & (user_count[users] >= k) & (item_count[items] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def _first_occurrences(users: np.ndarray, items: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Mask of the rows whose ``(user, item, time)`` did not occur on an earlier row."""
    order = np.lexsort((times, items, users))  # stable: equal rows keep file order
    u, i, t = users[order], items[order], times[order]
    repeat = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])
    keep = np.ones(users.size, bool)
    keep[order[1:][repeat]] = False
    return keep


def _kept_by_kcore(users: np.ndarray, items: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """``_kcore_mask`` applied to the selected ``rows`` only, as a mask over all rows."""
    keep = np.zeros(users.size, bool)
    keep[np.flatnonzero(rows)[_kcore_mask(users[rows], items[rows], k)]] = True
    return keep


def _remap_categories(
    raw_ids: np.ndarray, categories: tuple[np.ndarray, sp.csr_matrix]
) -> sp.csr_matrix:
    """Rows of ``categories`` (keyed by sorted raw item id) for items 1..I, with empty row 0."""
    keys, table = categories
    if keys.size == 0:
        return sp.csr_matrix((raw_ids.size + 1, table.shape[1]), dtype=np.float32)
    pos = np.searchsorted(keys, raw_ids).clip(0, keys.size - 1)
    found = keys[pos] == raw_ids
    rows = np.flatnonzero(found) + 1
    select = sp.csr_matrix(
        (np.ones(rows.size, np.float32), (rows, pos[found])),
        shape=(raw_ids.size + 1, table.shape[0]),
    )
    out = (select @ table.astype(np.float32)).tocsr()
    out.sort_indices()
    return out


def _build(
    name: str,
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    *,
    source: str,
    kcore: int,
    min_len: int,
    keep_duplicates: bool = False,
    categories: tuple[np.ndarray, sp.csr_matrix] | None = None,
    category_names: Sequence[str] | None = None,
) -> SequenceDataset:
    """Deduplicate, filter, remap and split raw ``(user, item, time)`` interactions."""
    if kcore < 0:
        raise ValueError(f"kcore must be >= 0, got {kcore}")
    if min_len < 3:
        raise ValueError(f"min_len must be >= 3 (train, valid and test items), got {min_len}")
    user_raw, user_code = np.unique(users, return_inverse=True)
    item_raw, item_code = np.unique(items, return_inverse=True)
    keep = np.ones(user_code.size, bool) if keep_duplicates else _first_occurrences(
        user_code, item_code, times)
    duplicates = int(user_code.size - keep.sum())
    keep = _kept_by_kcore(user_code, item_code, keep, kcore)
    keep &= np.bincount(user_code[keep], minlength=user_raw.size)[user_code] >= min_len
    if not keep.any():
        raise DataError(
            f"{source}: no user left after filtering: every user has fewer than {min_len} "
            f"interactions (kcore={kcore}, min_len={min_len}, {duplicates} duplicates dropped)"
        )

    # Codes come from sorted raw ids, so ranking the surviving codes keeps sorted raw-id order.
    kept_users, user_code = np.unique(user_code[keep], return_inverse=True)
    kept_items, item_code = np.unique(item_code[keep], return_inverse=True)
    order = np.lexsort((times[keep], user_code))  # stable: equal times keep file order
    user_code, item_ids = user_code[order], (item_code[order] + 1).astype(np.int32)

    num_users = kept_users.size
    ends = np.cumsum(np.bincount(user_code, minlength=num_users))
    train = np.ones(item_ids.size, bool)
    train[ends - 1] = train[ends - 2] = False
    offsets = np.concatenate([[0], ends - 2 * np.arange(1, num_users + 1)])

    item_categories = None
    if categories is not None:
        item_categories = _remap_categories(item_raw[kept_items], categories)
    return SequenceDataset(
        name=name,
        num_users=num_users,
        num_items=kept_items.size,
        train_items=item_ids[train],
        train_offsets=offsets,
        valid=item_ids[ends - 2],
        test=item_ids[ends - 1],
        item_categories=item_categories,
        category_names=None if category_names is None else tuple(category_names),
        duplicates_dropped=duplicates,
        users_dropped=user_raw.size - num_users,
    )


# --------------------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------------------


_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
               b"PK\x03\x04": "zip", b"\x28\xb5\x2f\xfd": "zstd"}


def _check_file(path: PathLike) -> Path:
    """``path`` as a ``Path`` if it is a regular file that looks like text (its first 64 KiB
    hold no NUL byte and do not start like a compressed archive)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    kind = next((k for magic, k in _COMPRESSED.items() if head.startswith(magic)), None)
    if kind is not None:
        raise DataError(f"{path}: a {kind}-compressed file; decompress it first")
    if b"\x00" in head:
        line = head.count(b"\n", 0, head.index(b"\x00")) + 1
        raise DataError(f"{path}:{line}: binary data (a NUL byte), not a text file")
    return path


def _read_text(path: Path, encoding: str) -> str:
    """The file's text; a leading UTF-8 byte-order mark is dropped whatever the encoding."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid {encoding} text") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def _universal_newlines(text: str) -> str:
    """``\r\n`` (Windows) and a lone ``\r`` (classic Mac OS) as ``\n``, as Python's text mode."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _data_lines(path: Path, encoding: str) -> tuple[list[str], np.ndarray]:
    """Non-blank lines (without line breaks) and their 1-based line numbers."""
    lines = _universal_newlines(_read_text(path, encoding)).split("\n")
    keep = np.fromiter(map(len, map(str.strip, lines)), np.int64, len(lines)) > 0
    return list(itertools.compress(lines, keep)), np.flatnonzero(keep) + 1


def _snippet(line: str) -> str:
    return repr(line if len(line) <= 60 else line[:57] + "...")


def _parses(token: str, dtype: type) -> bool:
    """Whether ``token`` converts like the vectorised path does (floats must be finite)."""
    try:
        value: np.ndarray = np.array(token, dtype=dtype)
    except (ValueError, OverflowError):
        return False
    return dtype is np.int64 or bool(np.isfinite(value))


def _convert(
    tokens: list[str],
    dtype: type,
    what: str,
    path: Path,
    line_of: Callable[[int], int],
) -> np.ndarray:
    """Convert string tokens to ``dtype``; on failure name the first bad token's line."""
    try:
        out: np.ndarray = np.array(tokens, dtype=dtype)
        if dtype is np.int64 or np.isfinite(out).all():
            return out
    except (ValueError, OverflowError):
        pass
    k = next(k for k, token in enumerate(tokens) if not _parses(token, dtype))
    if dtype is np.int64 and _is_integer_literal(tokens[k]):
        raise DataError(f"{path}:{line_of(k)}: {what} {_snippet(tokens[k].strip())} is out of "
                        "range: ids must lie in [-2**63, 2**63) (64-bit integers)")
    kind = "an integer" if dtype is np.int64 else "a finite number"
    raise DataError(f"{path}:{line_of(k)}: {what} {_snippet(tokens[k])} is not {kind}")


def _timestamps(tokens: list[str], path: Path, line_of: Callable[[int], int]) -> np.ndarray:
    """Timestamps as int64 when every one is an integer (exact: nanosecond epochs exceed
    float64's 2^53), else as float64."""
    try:
        return np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        return _convert(tokens, np.float64, "timestamp", path, line_of)


def _is_integer_literal(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def _split_fields(
    path: Path, lines: list[str], linenos: np.ndarray, sep: str, nfields: int
) -> list[list[str]]:
    """Columns of a ``sep``-separated file whose every line has exactly ``nfields`` fields."""
    counts = np.fromiter(map(str.count, lines, itertools.repeat(sep)), np.int64, len(lines))
    bad = np.flatnonzero(counts != nfields - 1)
    if bad.size:
        k = bad[0]
        raise DataError(
            f"{path}:{linenos[k]}: expected {nfields} {sep!r}-separated fields, "
            f"got {counts[k] + 1}: {_snippet(lines[k])}"
        )
    flat = sep.join(lines).split(sep)
    return [flat[j::nfields] for j in range(nfields)]


MISSING_IDS = frozenset({"", "na", "n/a", "nan", "null", "none"})


def _ints_or_strings(tokens: list[str], what: str, path: Path,
                     line_of: Callable[[int], int]) -> np.ndarray:
    """Integer ids when every token is an integer (numeric order), else strings; surrounding
    spaces are not part of an id, and a missing one (``MISSING_IDS``) is a ``DataError``."""
    tokens = [t.strip() for t in tokens]
    missing = next((k for k, t in enumerate(tokens) if t.lower() in MISSING_IDS), None)
    if missing is not None:
        raise DataError(f"{path}:{line_of(missing)}: missing {what} ({tokens[missing]!r})")
    try:
        return np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        return np.array(tokens, dtype=str)


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------


def load_seqtxt(
    path: PathLike, *, kcore: int = 0, min_len: int = 3, keep_duplicates: bool = False
) -> SequenceDataset:
    """Load a ``user item item ...`` file (one user a line, integer ids, items in time order).

    This is the common sequential-recommendation format (e.g. ``Beauty.txt``). A user listed
    on several lines gets the lines' items in file order. The file has no timestamps, so a
    repeated item is a repeat consumption, never a duplicate row. A file whose lines are, at
    least half of them, ``user<TAB>item<TAB>rating<TAB>timestamp`` (MovieLens ratings) is
    refused.
    """
    path = _check_file(path)
    lines, linenos = _data_lines(path, "utf-8")
    ratings = _ratings_lines(lines)
    if 2 * ratings.size >= len(lines):
        k = ratings[0]
        raise DataError(
            f"{path}:{linenos[k]}: found tab-separated user, item, rating, timestamp "
            f"({_snippet(lines[k])}) on {ratings.size} of {len(lines)} lines, expected a user "
            "id followed by item ids; for a ratings file use --format movielens"
        )
    fields = [line.split() for line in lines]
    lengths = np.fromiter(map(len, fields), np.int64, len(fields))
    short = np.flatnonzero(lengths < 2)
    if short.size:
        k = short[0]
        raise DataError(
            f"{path}:{linenos[k]}: expected a user id followed by item ids, found "
            f"{_snippet(lines[k])}{_format_hint(lines[k])}"
        )
    starts = np.cumsum(lengths) - lengths
    flat = list(itertools.chain.from_iterable(fields))
    line_of = lambda k: int(linenos[np.searchsorted(starts, k, side="right") - 1])  # noqa: E731
    ids = _convert(flat, np.int64, "id", path, line_of)
    is_item = np.ones(ids.size, bool)
    is_item[starts] = False
    users = np.repeat(ids[starts], lengths - 1)
    items = ids[is_item]
    return _build(
        path.stem, users, items, np.arange(items.size), source=str(path), kcore=kcore,
        min_len=min_len, keep_duplicates=keep_duplicates,
    )


def _ratings_lines(lines: list[str]) -> np.ndarray:
    """Indices of the lines with four tab-separated fields, as in MovieLens ``u.data``."""
    return np.flatnonzero([line.strip().count("\t") == 3 for line in lines])


def _format_hint(line: str) -> str:
    """Advice for a sequence-file line that belongs to another format."""
    if "::" in line:
        return " (a MovieLens ratings.dat line; use --format movielens)"
    if "," in line:
        return " (a CSV line; use --format csv)"
    return ""


def _movielens_files(path: Path) -> tuple[Path, str, Path | None, Path | None]:
    """(ratings file, separator, item file, genre file) of a MovieLens directory or file."""
    if path.is_dir():
        for ratings in ("u.data", "ratings.dat"):
            if (path / ratings).is_file():
                path = path / ratings
                break
        else:
            raise DataError(f"{path}: no u.data or ratings.dat in this directory")
    path = _check_file(path)
    with open(path, encoding="latin-1") as f:
        first = next((line for line in f if line.strip()), "")
    sep = "::" if "::" in first else "\t"
    folder = path.parent
    if sep == "\t":
        items, genres = folder / "u.item", folder / "u.genre"
        if items.is_file() and genres.is_file():
            return path, sep, items, genres
    elif (folder / "movies.dat").is_file():
        return path, sep, folder / "movies.dat", None
    return path, sep, None, None


def _incidence(ids: list[int], rows: list[int], cols: list[int], num_cols: int):
    """Sorted item-id keys and their (len(ids), num_cols) 0/1 CSR incidence matrix."""
    ids_arr = np.asarray(ids, np.int64)
    order = np.argsort(ids_arr, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    table = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rank[np.asarray(rows, np.int64)], cols)),
        shape=(ids_arr.size, num_cols),
    )
    table.sum_duplicates()
    table.data[:] = 1.0
    return ids_arr[order], table


def _parse_u_item(items: Path, genres: Path):
    """Genres of ml-100k: names from ``u.genre``, 0/1 flags from the last columns of ``u.item``."""
    index: dict[int, str] = {}
    lines, linenos = _data_lines(genres, "latin-1")
    for line, no in zip(lines, linenos, strict=True):
        name, _, idx = line.rpartition("|")
        if not name or not idx.strip().isdigit():
            raise DataError(f"{genres}:{no}: expected 'name|index': {_snippet(line)}")
        index[int(idx)] = name
    if sorted(index) != list(range(len(index))):
        raise DataError(f"{genres}: genre indices must be 0..{len(index) - 1}")
    names = tuple(index[i] for i in range(len(index)))

    ids, rows, cols = [], [], []
    lines, linenos = _data_lines(items, "latin-1")
    for row, (line, no) in enumerate(zip(lines, linenos, strict=True)):
        fields = line.split("|")
        flags = fields[-len(names):]
        if len(fields) < len(names) + 2 or not fields[0].strip().isdigit() or any(
            f not in ("0", "1") for f in flags
        ):
            raise DataError(
                f"{items}:{no}: expected 'id|title|...|' and {len(names)} 0/1 genre flags: "
                f"{_snippet(line)}"
            )
        ids.append(int(fields[0]))
        hits = [j for j, f in enumerate(flags) if f == "1"]
        rows += [row] * len(hits)
        cols += hits
    return (*_incidence(ids, rows, cols, len(names)), names)


def _parse_movies_dat(items: Path):
    """Genres of ml-1m-style ``movies.dat`` (``id::title::A|B``); names sorted."""
    ids, genre_lists = [], []
    lines, linenos = _data_lines(items, "latin-1")
    for line, no in zip(lines, linenos, strict=True):
        head, _, genres = line.rpartition("::")
        movie_id = head.split("::", 1)[0].strip()
        if "::" not in head or not movie_id.isdigit():
            raise DataError(f"{items}:{no}: expected 'id::title::genres': {_snippet(line)}")
        ids.append(int(movie_id))
        listed = genres.strip().split("|")
        genre_lists.append([g for g in listed if g and g != "(no genres listed)"])
    names = tuple(sorted(set(itertools.chain.from_iterable(genre_lists))))
    col = {name: j for j, name in enumerate(names)}
    rows = [r for r, gs in enumerate(genre_lists) for _ in gs]
    cols = [col[g] for gs in genre_lists for g in gs]
    return (*_incidence(ids, rows, cols, len(names)), names)


def load_movielens(
    path: PathLike, *, kcore: int = 0, min_len: int = 3, keep_duplicates: bool = False
) -> SequenceDataset:
    """Load MovieLens: a directory (``u.data`` or ``ratings.dat``) or the ratings file itself.

    Every rating counts as an interaction. Each user's ratings are ordered by timestamp, ties
    by file order. Genres become ``item_categories`` when the item file is beside the ratings
    (``u.item`` + ``u.genre``, or ``movies.dat``). The data set is named after the folder.
    """
    ratings, sep, items_file, genres_file = _movielens_files(Path(path))
    lines, linenos = _data_lines(ratings, "latin-1")
    user, item, _, ts = _split_fields(ratings, lines, linenos, sep, 4)
    line_of = lambda k: int(linenos[k])  # noqa: E731
    users = _convert(user, np.int64, "user id", ratings, line_of)
    items = _convert(item, np.int64, "item id", ratings, line_of)
    times = _timestamps(ts, ratings, line_of)
    categories = names = None
    if items_file is not None:
        if genres_file is not None:
            keys, table, names = _parse_u_item(items_file, genres_file)
        else:
            keys, table, names = _parse_movies_dat(items_file)
        categories = (keys, table)
    return _build(
        ratings.resolve().parent.name, users, items, times, source=str(ratings), kcore=kcore,
        min_len=min_len, keep_duplicates=keep_duplicates, categories=categories,
        category_names=names,
    )


def _is_float_literal(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


# words in the header name of a third CSV column that is not a time (a ratings or counts file;
# whole words, singular: "stars" matches, "start_time" does not)
NOT_A_TIME_COLUMN = ("rating", "score", "star", "count", "weight", "label")


CSV_COLUMNS = ("user", "item", "time")
# words of a header name that give its column's role (whole words, singular)
_COLUMN_WORDS = {
    "user": ("user", "uid", "customer", "reviewer", "visitor", "member"),
    "item": ("item", "iid", "movie", "product", "business", "asin", "book", "song", "article"),
    "time": ("time", "timestamp", "date", "datetime", "ts", "unixtime", "t"),
}


def _column_role(name: str) -> str | None:
    """``"user"``, ``"item"`` or ``"time"`` for a CSV header name (``userId``, ``movie_id``,
    ``unix_time``...), None when it names none or more than one."""
    words = {w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", name)}
    words |= {w[:-1] for w in words if w.endswith("s")}  # plurals
    roles = [role for role, names in _COLUMN_WORDS.items() if words & set(names)]
    return roles[0] if len(roles) == 1 else None


def load_csv(
    path: PathLike, *, kcore: int = 0, min_len: int = 3, keep_duplicates: bool = False
) -> SequenceDataset:
    """Load a ``user,item,timestamp`` CSV (standard quoting; optional header line).

    The first line is a header when none of its three fields is a number (so ``1,2,x`` or
    ``1,2,nan`` is a data row, and an error); a header whose third name says it is not a
    time (``NOT_A_TIME_COLUMN``: e.g. ``userId,movieId,rating``) is an error, not an order.
    A header naming the three columns in another order (``timestamp,user,item``) is read by
    name.
    Ids are integers (ordered numerically) when every id of the column is an integer,
    otherwise arbitrary strings (ordered lexicographically). Timestamps are numbers; ties
    keep file order.
    """
    path = _check_file(path)
    text = _read_text(path, "utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, linenos = [], []
    for row in reader:
        if row and any(field.strip() for field in row):
            rows.append(row)
            linenos.append(reader.line_num)
    header = None
    if rows and len(rows[0]) == 3 and not any(map(_is_float_literal, rows[0])):
        third = rows[0][2].strip()
        words = {w.rstrip("s") for w in re.findall(r"[a-z]+", third.lower())}
        if words & set(NOT_A_TIME_COLUMN):
            raise DataError(f"{path}:{linenos[0]}: the third column is {third!r}, not a time: "
                            "the CSV format is user,item,timestamp (the timestamp orders each "
                            "user's items)")
        roles = [_column_role(name) for name in rows[0]]
        if sorted(filter(None, roles)) == sorted(CSV_COLUMNS) and tuple(roles) != CSV_COLUMNS:
            header = roles
        rows, linenos = rows[1:], linenos[1:]
    if not rows:
        raise DataError(f"{path}: file is empty (no data lines)")
    widths = np.fromiter(map(len, rows), np.int64, len(rows))
    bad = np.flatnonzero(widths != 3)
    if bad.size:
        k = bad[0]
        raise DataError(
            f"{path}:{linenos[k]}: expected 3 comma-separated fields (user,item,timestamp), "
            f"got {widths[k]}"
        )
    user, item, ts = (list(column) for column in zip(*rows, strict=True))
    if header is not None:  # columns named in another order: read them by name
        user, item, ts = ([user, item, ts][header.index(role)] for role in CSV_COLUMNS)
    line_of = lambda k: linenos[k]  # noqa: E731
    times = _timestamps(ts, path, line_of)
    return _build(
        path.stem, _ints_or_strings(user, "user id", path, line_of),
        _ints_or_strings(item, "item id", path, line_of), times, source=str(path),
        kcore=kcore, min_len=min_len, keep_duplicates=keep_duplicates,
    )


def synthetic(
    num_users: int = 1000,
    num_items: int = 1000,
    num_clusters: int = 25,
    seq_len: tuple[int, int] = (8, 30),
    seed: int = 0,
    *,
    p_successor: float = 0.1,
    p_cluster: float = 0.6,
    p_noise: float = 0.1,
    zipf: float = 0.8,
    kcore: int = 0,
    min_len: int = 3,
) -> SequenceDataset:
    """A deterministic data set with planted cluster structure (``item_categories`` = clusters).

    Items are split at random into ``num_clusters`` equal clusters, each with a cyclic item
    order; popularity is Zipf-like (weight ``rank ** -zipf``). Every user prefers one or two
    clusters and starts in one. Each next item is: with ``p_successor`` the current item's
    successor in its cluster's order; with ``p_cluster`` a popularity-weighted item of the
    current item's cluster; with ``p_noise`` a popularity-weighted item of any cluster;
    otherwise a popularity-weighted item of one of the user's preferred clusters. Sequence
    lengths are uniform in ``seq_len`` (inclusive). Items that never occur are dropped.
    """
    lo, hi = seq_len
    if not 1 <= num_clusters <= num_items:
        raise ValueError("need 1 <= num_clusters <= num_items")
    if not min_len <= lo <= hi:
        raise ValueError(f"need min_len <= seq_len[0] <= seq_len[1], got {seq_len}")
    if min(p_successor, p_cluster, p_noise) < 0 or p_successor + p_cluster + p_noise > 1:
        raise ValueError("transition probabilities must be >= 0 and sum to at most 1")
    rng = np.random.default_rng(seed)

    # Cluster c holds the items perm[bounds[c]:bounds[c+1]], in that (cyclic) order.
    perm = rng.permutation(num_items) + 1
    bounds = np.arange(num_clusters + 1) * num_items // num_clusters
    cluster_at = np.repeat(np.arange(num_clusters), np.diff(bounds))
    cluster_of = np.empty(num_items + 1, np.int64)
    cluster_of[perm] = cluster_at
    next_pos = np.arange(1, num_items + 1)
    next_pos[bounds[1:] - 1] = bounds[:-1]
    successor = np.empty(num_items + 1, np.int64)
    successor[perm] = perm[next_pos]

    weight = (rng.permutation(num_items) + 1.0) ** -zipf  # weight of perm[k]
    global_cdf = np.cumsum(weight) / weight.sum()
    cluster_sums = np.add.reduceat(weight, bounds[:-1])
    within = np.cumsum(weight) - np.repeat(np.cumsum(cluster_sums) - cluster_sums, np.diff(bounds))
    cluster_cdf = cluster_at + within / np.repeat(cluster_sums, np.diff(bounds))

    def in_cluster(c: np.ndarray) -> np.ndarray:
        k = np.searchsorted(cluster_cdf, c + rng.random(c.size), side="right")
        return perm[np.clip(k, bounds[c], bounds[c + 1] - 1)]

    def anywhere(n: int) -> np.ndarray:
        k = np.searchsorted(global_cdf, rng.random(n), side="right")
        return perm[np.minimum(k, num_items - 1)]

    first = rng.integers(num_clusters, size=num_users)
    second = (first + 1 + rng.integers(max(num_clusters - 1, 1), size=num_users)) % num_clusters
    second = np.where((rng.random(num_users) < 0.5) | (num_clusters == 1), first, second)
    lengths = rng.integers(lo, hi + 1, size=num_users)

    seqs = np.empty((num_users, hi), np.int64)
    seqs[:, 0] = in_cluster(first)
    cut = np.cumsum([p_successor, p_cluster, p_noise])
    for t in range(1, hi):
        cur = seqs[:, t - 1]
        move = np.searchsorted(cut, rng.random(num_users), side="right")
        preferred = np.where(rng.random(num_users) < 0.5, first, second)
        seqs[:, t] = np.select(
            [move == 0, move == 1, move == 2],
            [successor[cur], in_cluster(cluster_of[cur]), anywhere(num_users)],
            in_cluster(preferred),
        )

    mask = np.arange(hi) < lengths[:, None]
    users = np.repeat(np.arange(num_users), lengths)
    one_hot = sp.csr_matrix(
        (np.ones(num_items, np.float32), (np.arange(num_items), cluster_of[1:])),
        shape=(num_items, num_clusters),
    )
    return _build(
        "synthetic", users, seqs[mask], np.arange(users.size), source="synthetic",
        kcore=kcore, min_len=min_len,
        categories=(np.arange(1, num_items + 1), one_hot),
        category_names=[f"cluster{c}" for c in range(num_clusters)],
    )


# --------------------------------------------------------------------------------------
# Entry point with caching
# --------------------------------------------------------------------------------------


def detect_format(path: PathLike) -> str:
    """The format of ``path`` from its content: ``"movielens"`` for a directory or a first
    line that is a ``ratings.dat`` line (``::``) or tab-separated ``user item rating timestamp``
    (as in ``u.data``, ``u1.base``), ``"csv"`` for a comma-separated one, else ``"seqtxt"``.
    Lines of 3 or 4 integers ending in a Unix time (``1 6 1600000000``) are a ``DataError``:
    read as sequences, their timestamps would become items.

    Only the first lines are read; the loader then checks the whole file against the format.
    """
    path = Path(path)
    if path.is_dir():
        return "movielens"
    path = _check_file(path)
    with open(path, "rb") as f:
        head = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf").decode("latin-1")
    lines = [line for line in _universal_newlines(head).split("\n") if line.strip()][:5]
    if not lines:
        return "seqtxt"  # the loader reports the empty file
    if "::" in lines[0] or _ratings_lines(lines[:1]).size:
        return "movielens"
    if "," in lines[0]:
        return "csv"
    # the last of these lines may be cut short by the 64 KiB read: judge it only when alone
    if all(_looks_like_timed_row(line) for line in lines[:-1] or lines):
        raise DataError(
            f"{path}:1: {_snippet(lines[0])} looks like a whitespace-separated 'user item "
            "[rating] timestamp' row (the last field is a Unix time), not a sequence 'user "
            "item item ...': write it as a user,item,timestamp CSV, or pass --format seqtxt "
            "if the lines are sequences")
    return "seqtxt"


def _looks_like_timed_row(line: str) -> bool:
    """3 or 4 whitespace-separated integers whose last one is at least 10^8 (a Unix time in
    seconds after 1973, or in milliseconds)."""
    fields = line.split()
    return (len(fields) in (3, 4) and all(map(_is_integer_literal, fields))
            and int(fields[-1]) >= 10**8)


def _fingerprint(fmt: str, path: Path, kcore: int, min_len: int, keep_duplicates: bool) -> str:
    """Hash of the format, absolute path, size, mtime and ctime of the input(s) and the
    filters. The ctime (the inode's last change, which no tool can set back) catches a file
    rewritten with its old size and mtime (``cp -p``, ``rsync -t``); a ``chmod`` or ``touch``
    changes it too, and only costs a re-parse.

    MovieLens inputs are the files the loader reads: the ratings and, beside them, the item
    and genre files (not the rest of the folder, which may hold the cache itself)."""
    if fmt == "movielens":
        files = [p for p in _movielens_files(path) if isinstance(p, Path)]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stamp = [(p.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
             for p, st in ((p, p.stat()) for p in files)]
    key = [_CACHE_VERSION, fmt, str(path.resolve()), stamp, kcore, min_len, keep_duplicates]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _cache_name(fmt: str, path: Path) -> str:
    if fmt == "movielens":
        return (path if path.is_dir() else path.parent).resolve().name
    return path.stem


def load_dataset(
    fmt: str,
    path: PathLike | None = None,
    *,
    cache_dir: PathLike | None = None,
    kcore: int = 0,
    min_len: int = 3,
    keep_duplicates: bool = False,
    **kwargs,
) -> SequenceDataset:
    """Load a data set of format ``fmt`` (one of :data:`FORMATS`) from ``path``.

    With ``cache_dir`` the processed data set is stored as ``<cache_dir>/<name>-<hash>.npz``
    (the hash covers format, absolute path, size, mtime and ctime of the input, ``kcore``,
    ``min_len`` and ``keep_duplicates``) and later calls read it instead of re-parsing.
    ``"synthetic"`` ignores ``path`` and ``cache_dir`` and forwards ``kwargs`` to
    :func:`synthetic`.
    """
    loaders = {"seqtxt": load_seqtxt, "movielens": load_movielens, "csv": load_csv}
    if fmt == "synthetic":
        return synthetic(kcore=kcore, min_len=min_len, **kwargs)
    if fmt not in loaders:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if kwargs:
        raise TypeError(f"format {fmt!r} takes no options {sorted(kwargs)}")
    if path is None:
        raise DataError(f"format {fmt!r} needs a path")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found")
    load = lambda: loaders[fmt](  # noqa: E731
        path, kcore=kcore, min_len=min_len, keep_duplicates=keep_duplicates)
    if cache_dir is None:
        return load()

    cache_dir = Path(cache_dir)
    fingerprint = _fingerprint(fmt, path, kcore, min_len, keep_duplicates)
    cache = cache_dir / f"{_cache_name(fmt, path)}-{fingerprint}.npz"
    if cache.is_file():
        try:
            return SequenceDataset.load(cache)
        except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile):
            pass  # unreadable or inconsistent cache: rebuild it
    dataset = load()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        dataset.save(cache)
    except OSError as e:
        raise DataError(f"cache folder {cache_dir} cannot be written ({e.strerror or e}); "
                        "choose another or leave the cache out") from None
    return dataset
