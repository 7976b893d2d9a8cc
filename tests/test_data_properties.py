"""Property test (hypothesis): a data file of any supported format (sequence text, CSV,
MovieLens ``u.data``/``ratings.dat`` as a file or a folder), well-formed, reformatted
harmlessly or damaged on one line, loads through the command line (``--data-stats``, no
training) either with exactly the statistics of what was written, or fails with one clean
line on stderr that names the file (exit 2, no traceback). Never a silent change.
"""

import contextlib
import io
import json
import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sevo_jax.train import main

FORMATS = ("seqtxt", "csv", "udata", "dat")
CLI_FORMAT = {"seqtxt": "seqtxt", "csv": "csv", "udata": "movielens", "dat": "movielens"}
# names that say nothing or the wrong thing about the content
NAMES = ("data.txt", "u1.base", "log.csv", "ratings.dat", "u.data", "seq")
HARMLESS = ("none", "crlf", "bom", "blank_lines", "duplicates", "shuffle", "header")
DAMAGE = ("bad_token", "drop_field", "extra_field", "bad_utf8")
BAD_INT = ("x", "1.5", "99999999999999999999", "-", "1e3", "0x1")
BAD_TIME = ("x", "nan", "inf", "", "1,5")


def expected_stats(fmt: str, rows: list[tuple[int, int, int]]) -> dict | None:
    """Users, items, interactions and what was dropped, as written; None: nobody is left."""
    distinct = list(dict.fromkeys(rows)) if fmt != "seqtxt" else rows
    per_user: dict[int, list[int]] = {}
    for u, i, _ in distinct:
        per_user.setdefault(u, []).append(i)
    kept = {u: items for u, items in per_user.items() if len(items) >= 3}
    if not kept:
        return None
    return {"users": len(kept), "items": len({i for items in kept.values() for i in items}),
            "interactions": sum(map(len, kept.values())),
            "duplicates_dropped": len(rows) - len(distinct),
            "users_dropped": len(per_user) - len(kept)}


def render(fmt: str, rows: list[tuple[int, int, int]], header: bool) -> list[str]:
    """The file's lines (no line breaks); seqtxt: one line per user, items in time order."""
    if fmt == "seqtxt":
        users: dict[int, list[int]] = {}
        for u, i, _ in sorted(rows, key=lambda r: (r[0], r[2])):
            users.setdefault(u, []).append(i)
        return [" ".join(map(str, [u, *items])) for u, items in users.items()]
    sep = {"csv": ",", "udata": "\t", "dat": "::"}[fmt]
    lines = ["user,item,timestamp"] if header and fmt == "csv" else []
    for u, i, t in rows:
        fields = [u, i, t] if fmt == "csv" else [u, i, 1 + (u + i) % 5, t]
        lines.append(sep.join(map(str, fields)))
    return lines


@st.composite
def data_files(draw):
    fmt = draw(st.sampled_from(FORMATS))
    num_users = draw(st.integers(1, 5))
    rows = []
    for u in range(1, num_users + 1):
        items = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
        start = draw(st.integers(0, 10**9))
        rows += [(u, i, start + k) for k, i in enumerate(items)]
    change = draw(st.sampled_from(HARMLESS + DAMAGE))
    rng = random.Random(draw(st.integers(0, 2**16)))
    if fmt == "seqtxt" and change in ("duplicates", "shuffle", "header"):
        change = "none"  # no timestamps: a repeated line is a repeat consumption
    if fmt != "csv" and change == "header":
        change = "none"
    if change == "duplicates":
        rows = rows + rng.sample(rows, rng.randint(1, len(rows)))
    if change == "shuffle":
        rng.shuffle(rows)
    lines = render(fmt, rows, header=change == "header")
    must_fail = change in DAMAGE
    k = 0 if rng.random() < 0.4 else rng.randrange(len(lines))  # the first line decides most
    if change == "bad_token":
        fields = lines[k].split(" " if fmt == "seqtxt" else {"csv": ",", "udata": "\t",
                                                              "dat": "::"}[fmt])
        if fmt == "seqtxt":
            j, bad = rng.randrange(len(fields)), rng.choice(BAD_INT)
        elif fmt == "csv":  # ids may be any string; the timestamp must be a number
            j, bad = 2, rng.choice(BAD_TIME)
        else:
            j = rng.choice([0, 1, 3])
            bad = rng.choice(BAD_TIME if j == 3 else BAD_INT)
        fields[j] = bad
        sep = " " if fmt == "seqtxt" else {"csv": ",", "udata": "\t", "dat": "::"}[fmt]
        lines[k] = sep.join(fields)
        if fmt == "csv" and bad == "1,5":
            must_fail = True  # a fourth field
    elif change in ("drop_field", "extra_field"):
        if fmt == "seqtxt":
            change, must_fail = "none", False
        else:
            sep = {"csv": ",", "udata": "\t", "dat": "::"}[fmt]
            fields = lines[k].split(sep)
            fields = fields[:-1] if change == "drop_field" else fields + ["7"]
            lines[k] = sep.join(fields)
    if change == "blank_lines":
        for _ in range(rng.randint(1, 3)):
            lines.insert(rng.randint(0, len(lines)), rng.choice(["", "   "]))
    text = ("\r\n" if change == "crlf" else "\n").join(lines) + "\n"
    blob = text.encode()
    if change == "bom":
        blob = b"\xef\xbb\xbf" + blob
    if change == "bad_utf8":
        if fmt in ("udata", "dat"):  # MovieLens files are latin-1: any byte is text
            change, must_fail = "none", False
        else:
            cut = rng.randrange(len(blob))
            blob = blob[:cut] + b"\xff" + blob[cut:]
    name = draw(st.sampled_from(NAMES))
    explicit = draw(st.booleans())
    # MovieLens may also be given as its folder when the ratings file has its standard name
    as_folder = (fmt, name) in (("udata", "u.data"), ("dat", "ratings.dat")) and draw(st.booleans())
    # one line of five tab-separated integers is a valid sequence line (a user, four items)
    assume(explicit or not (fmt == "udata" and change == "extra_field" and len(lines) == 1))
    expected = None if must_fail else expected_stats(fmt, rows)
    return fmt, name, blob, explicit, as_folder, expected, change


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data_files())
def test_any_file_loads_exactly_or_fails_in_one_line_naming_it(case):
    fmt, name, blob, explicit, as_folder, expected, change = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(blob)
        argv = ["--data", folder if as_folder else str(path), "--data-stats"]
        if explicit:
            argv += ["--format", CLI_FORMAT[fmt]]
        code, out, err = run_cli(argv)
    context = (fmt, name, change, explicit, as_folder, blob[:200], out, err)
    if code == 0:
        stats = json.loads(out)
        assert stats["format"] == CLI_FORMAT[fmt], context
        got = {k: stats[k] for k in ("users", "items", "interactions", "duplicates_dropped",
                                     "users_dropped")}
        assert expected is not None and got == expected, (got, expected, context)
    else:
        assert code == 2 and "Traceback" not in err, context
        assert len(err.strip().splitlines()) == 1 and name in err, context
        if expected is not None:  # a harmless change may only fail for a data-set reason
            raise AssertionError(f"a well-formed file was refused: {context}")
    if expected is None and change == "none":
        assert code == 2 and "no user left" in err, context
