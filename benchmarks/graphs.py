"""Synthetic graph generators shared by the benchmarks (CPU, GPU and sharding).

Everything here is vectorised numpy: no Python loop runs over items, edges or sequences (the
only loops are a handful of calibration rounds), so the generators scale to 10M nodes and a few
hundred million non-zeros. Measured on a 2-core AMD EPYC (one process, peak RSS):

  * ``uniform_graph(10M, 200M)``: 8.7 s, 3.4 GB;  ``uniform_graph(1M, 20M)``: 0.5 s;
  * ``powerlaw_sequences(10M, 100M)``: 7.5 s, 2.6 GB; ``powerlaw_cooccurrence(10M, 100M)``:
    43 s, 12.8 GB (the library's ``cooccurrence_graph`` dominates; ~130 bytes per non-zero,
    so 10M nodes / 200M nnz wants ~25 GB); ``powerlaw_cooccurrence(1M, 20M)``: 8.6 s.

With ``alpha = 1`` many unpopular items never co-occur when ``nnz / num_nodes`` is small: about
11% isolated nodes at 1M nodes / 20M nnz, 34% at 10M / 100M (``alpha < 1`` spreads them out).

* ``powerlaw_sequences`` / ``powerlaw_cooccurrence``: training sequences whose items follow a
  Zipf-like popularity law, and the item-item co-occurrence graph the library builds from them
  (``sevo_jax.graph.cooccurrence_graph``, spec §1). Consecutive items are drawn independently,
  so the graph is a Chung-Lu-like power-law graph (expected degree ~ popularity); the hidden
  popularity rank is mapped to node ids by a random permutation, so hubs are scattered over the
  id range as in a real catalogue (which is what makes node reordering worth measuring).
* ``uniform_graph``: an Erdos-Renyi-like graph with exactly ``nnz`` stored entries.

Both are sized by the number of stored non-zeros of the SYMMETRIC adjacency (both (i, j) and
(j, i) count; a diagonal entry counts once), the quantity that sets the cost of a sparse matmul.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = [
    "zipf_items",
    "powerlaw_sequences",
    "powerlaw_cooccurrence",
    "random_edges",
    "uniform_graph",
    "symmetric_nnz",
]


def zipf_items(rng: np.random.Generator, num_items: int, size: int, alpha: float) -> np.ndarray:
    """``size`` popularity ranks in ``[0, num_items)`` with ``P(rank k) ~ (k + 1)^-alpha``.

    Inverse-CDF sampling of the continuous power law on ``[1, num_items + 1)`` then flooring
    (O(size), no search over a CDF table). ``alpha = 0`` is uniform.
    """
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    u = rng.random(size)
    top = float(num_items) + 1.0
    if abs(alpha - 1.0) < 1e-9:
        x = np.exp(u * np.log(top))
    else:
        e = 1.0 - alpha
        x = (1.0 + u * (top**e - 1.0)) ** (1.0 / e)
    k = x.astype(np.int64)
    k -= 1
    np.clip(k, 0, num_items - 1, out=k)
    return k


def _sequence_lengths(rng: np.random.Generator, num_tokens: int, mean_len: float, min_len: int):
    """Lengths ``min_len + Geometric`` (mean ``mean_len``) summing to about ``num_tokens``."""
    extra = max(mean_len - min_len, 1e-9)
    count = max(int(num_tokens / mean_len * 1.05) + 8, 1)
    lengths = min_len + rng.geometric(1.0 / (extra + 1.0), size=count) - 1
    cut = int(np.searchsorted(np.cumsum(lengths), num_tokens)) + 1
    return lengths[: max(cut, 1)].astype(np.int64)


def _pair_keys(flat: np.ndarray, lengths: np.ndarray, H: int, n: int) -> np.ndarray:
    """Unordered keys ``min * n + max`` of all pairs (x_i, x_j), 0 < j - i <= H, within sequences."""
    seq_id = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
    keys = []
    for h in range(1, H + 1):
        if flat.size <= h:
            break
        same = seq_id[:-h] == seq_id[h:]
        a = flat[:-h][same]
        b = flat[h:][same]
        keys.append(np.minimum(a, b) * n + np.maximum(a, b))
    return np.concatenate(keys) if keys else np.zeros(0, np.int64)


def symmetric_nnz(unordered_keys: np.ndarray, n: int) -> int:
    """Stored entries of the symmetric matrix given SORTED UNIQUE unordered keys ``min*n+max``."""
    diag = int(np.count_nonzero(unordered_keys // n == unordered_keys % n))
    return 2 * (unordered_keys.size - diag) + diag


def powerlaw_sequences(
    num_items: int,
    nnz_target: int,
    alpha: float = 1.0,
    seed: int = 0,
    *,
    mean_len: float = 20.0,
    min_len: int = 2,
    H: int = 1,
    rtol: float = 0.005,
    permute: bool = True,
    max_rounds: int = 40,
) -> tuple[list[np.ndarray], dict]:
    """Training sequences over ``num_items`` items whose H-window co-occurrence graph has
    about ``nnz_target`` stored non-zeros (within ``rtol``, from below or a little above).

    Items are Zipf(``alpha``)-popular, drawn independently; sequence lengths are
    ``min_len + Geometric`` with mean ``mean_len``. Sequences are generated in rounds until the
    number of DISTINCT co-occurring pairs reaches the target (repeated pairs do not add
    non-zeros, so the token count needed grows with ``alpha``).

    Returns ``(sequences, info)``: a list of int64 arrays with ids in ``[0, num_items)`` and a dict
    with ``num_tokens``, ``num_sequences``, ``nnz`` (exact, for ``num_pads``-shifted ids too) and
    ``rounds``.
    """
    if nnz_target < 1:
        raise ValueError(f"nnz_target must be >= 1, got {nnz_target}")
    max_nnz = num_items * num_items
    if nnz_target > 0.5 * max_nnz:
        raise ValueError(
            f"nnz_target={nnz_target} is more than half of the {num_items}^2 possible entries"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_items) if permute else None
    uniq = np.zeros(0, np.int64)
    nnz = 0
    flats: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    pairs_per_token = 1.0 - 1.0 / mean_len
    tokens = int(nnz_target / 2 / pairs_per_token) + 1  # first round: as if no pair repeated
    rounds = 0
    while nnz < nnz_target * (1.0 - rtol):
        rounds += 1
        if rounds > max_rounds:
            raise RuntimeError(
                f"powerlaw_sequences did not reach nnz_target={nnz_target} in {max_rounds} "
                f"rounds (got {nnz}); lower alpha or nnz_target"
            )
        lengths = _sequence_lengths(rng, tokens, mean_len, min_len)
        flat = zipf_items(rng, num_items, int(lengths.sum()), alpha)
        if perm is not None:
            flat = perm[flat]
        keys = _sort_unique(_pair_keys(flat, lengths, H, num_items))
        novel = keys[~_sorted_isin(keys, uniq)]
        uniq = np.concatenate([uniq, novel])
        uniq.sort(kind="stable")  # two sorted runs: a linear merge
        new_nnz = symmetric_nnz(uniq, num_items)
        gained = new_nnz - nnz
        nnz = new_nnz
        flats.append(flat)
        lens.append(lengths)
        if gained <= 0:
            raise RuntimeError(
                "powerlaw_sequences: a round added no new pair; the target is too dense for "
                f"num_items={num_items}, alpha={alpha}"
            )
        # Next round sized by this round's marginal yield (it only falls, so we undershoot).
        tokens = int((nnz_target - nnz) / (gained / flat.size)) + 1
    flat = np.concatenate(flats)
    lengths = np.concatenate(lens)
    sequences = np.split(flat, np.cumsum(lengths)[:-1])
    info = dict(
        num_tokens=int(flat.size),
        num_sequences=int(lengths.size),
        nnz=int(nnz),
        rounds=rounds,
        alpha=alpha,
        mean_len=mean_len,
        H=H,
    )
    return sequences, info


def _sort_unique(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an int array, by an in-place sort (``x`` is reordered).

    Much faster than ``np.unique`` for large integer arrays in numpy 2.x, whose default hash
    path measured ~80x slower than a sort here (10M int64 keys: 11 s vs 0.13 s).
    """
    if x.size == 0:
        return x
    x.sort()
    keep = np.empty(x.size, bool)
    keep[0] = True
    np.not_equal(x[1:], x[:-1], out=keep[1:])
    return x[keep]


def _sorted_isin(values: np.ndarray, sorted_ref: np.ndarray) -> np.ndarray:
    """``np.isin`` for a sorted reference array, by binary search."""
    if sorted_ref.size == 0:
        return np.zeros(values.shape, bool)
    pos = np.searchsorted(sorted_ref, values)
    pos[pos == sorted_ref.size] = 0
    return sorted_ref[pos] == values


def powerlaw_cooccurrence(
    num_nodes: int,
    nnz_target: int,
    alpha: float = 1.0,
    seed: int = 0,
    *,
    num_pads: int = 1,
    mean_len: float = 20.0,
    H: int = 1,
    return_info: bool = False,
):
    """RAW ``num_nodes``-square co-occurrence adjacency (``cooccurrence_graph``, spec §1) with
    about ``nnz_target`` stored non-zeros and Zipf(``alpha``) item popularity.

    Rows ``0 .. num_pads-1`` are padding (isolated), items are rows ``num_pads ..``; some
    unpopular items may be isolated too when ``nnz_target / num_nodes`` is small or ``alpha``
    large. Returns a float64 ``scipy.sparse.csr_matrix`` (and the ``info`` dict of
    ``powerlaw_sequences`` when ``return_info``). Normalise it with ``sevo_jax.graph.normalize``.
    """
    from sevo_jax.graph import cooccurrence_graph

    num_items = int(num_nodes) - int(num_pads)
    seqs, info = powerlaw_sequences(num_items, nnz_target, alpha, seed, mean_len=mean_len, H=H)
    a = cooccurrence_graph(seqs, num_items, H=H, num_pads=num_pads)
    info["nnz"] = int(a.nnz)
    return (a, info) if return_info else a


def random_edges(num_nodes: int, num_edges: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``num_edges`` uniformly random (src, dst) pairs (repeats and self-loops possible)."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, num_nodes, size=num_edges, dtype=np.int64)
    dst = rng.integers(0, num_nodes, size=num_edges, dtype=np.int64)
    return src, dst


def uniform_graph(num_nodes: int, nnz: int, seed: int = 0) -> sp.csr_matrix:
    """Erdos-Renyi-like RAW adjacency: ``nnz // 2`` distinct undirected edges ``i != j`` chosen
    uniformly, weight 1, stored symmetrically (exactly ``2 * (nnz // 2)`` non-zeros).

    Returns a float64 ``scipy.sparse.csr_matrix`` with sorted indices (int32 indices when they
    fit). Built directly in CSR form: peak memory ~ 24 bytes per stored non-zero (10M nodes,
    200M nnz: ~5 GB).
    """
    n = int(num_nodes)
    m = int(nnz) // 2
    if m > 0.5 * n * (n - 1) / 2:
        raise ValueError(f"nnz={nnz} is more than half of the possible entries for n={n}")
    rng = np.random.default_rng(seed)

    def draw(k):
        a = rng.integers(0, n, size=k, dtype=np.int64)
        b = rng.integers(0, n, size=k, dtype=np.int64)
        ok = a != b
        a, b = a[ok], b[ok]
        return _sort_unique(np.minimum(a, b) * n + np.maximum(a, b))

    keys = draw(m)  # sorted unique unordered keys i * n + j, i < j
    while keys.size < m:  # top up the pairs lost to repeats and self-pairs
        need = m - keys.size
        cand = draw(int(need * 1.1) + 16)
        cand = cand[~_sorted_isin(cand, keys)]
        rng.shuffle(cand)  # an unbiased subset of the new keys
        keys = np.concatenate([keys, cand[:need]])
        keys.sort(kind="stable")  # two sorted runs: a linear merge

    r, c = np.divmod(keys, n)
    deg = np.bincount(r, minlength=n) + np.bincount(c, minlength=n)
    index_dtype = np.int32 if max(n, 2 * m) < 2**31 else np.int64
    indptr = np.zeros(n + 1, dtype=index_dtype)
    np.cumsum(deg, out=indptr[1:])
    del deg
    sym = np.empty(2 * m, np.int64)
    sym[:m] = keys
    del keys
    np.multiply(c, n, out=sym[m:])
    sym[m:] += r
    del r, c
    sym.sort()  # row-major order of all stored entries
    indices = np.empty(2 * m, index_dtype)
    np.remainder(sym, n, out=indices, casting="unsafe")
    del sym
    a = sp.csr_matrix((np.ones(2 * m), indices, indptr), shape=(n, n))
    a.has_sorted_indices = True
    return a
