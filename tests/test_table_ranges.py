"""Positions and shards over a list of tables: every line read exactly once, with the same
global key, however the tables are split or resumed."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from v2t_engine.errors import ConfigError, RowError
from v2t_engine.inputs.table_ranges import TablePosition, read_tables, shard_bounds
from v2t_engine.inputs.tables import InputSchema, count_lines

SCHEMA = InputSchema.parse("idx:str:1,imgbase64:str:1")

# Lines as users' tables have them: rows, blank lines, short rows, CRLF, over-long lines.
line = st.sampled_from(["", "a\tb", "c\td\r", "bad", "\t", "x" * 40 + "\ty", "é\tz"])


def _write(tmp_path, tables: list[list[str]], trailing: list[bool]) -> list[str]:
    paths = []
    for i, (lines, end) in enumerate(zip(tables, trailing)):
        p = tmp_path / f"t{i}.txt"
        p.write_text("\n".join(lines) + ("\n" if end and lines else ""), encoding="utf-8")
        paths.append(str(p))
    return paths


def _summary(rows) -> list[tuple]:
    return [(r.key, type(r.item).__name__, r.item.line_no) for r in rows]


@settings(max_examples=60, deadline=None)
@given(tables=st.lists(st.lists(line, max_size=8), min_size=1, max_size=3),
       trailing=st.lists(st.booleans(), min_size=3, max_size=3), shards=st.integers(1, 5))
def test_shards_tile_the_tables(tmp_path_factory, tables, trailing, shards):
    paths = _write(tmp_path_factory.mktemp("t"), tables, trailing)
    whole = _summary(read_tables(paths, SCHEMA, 32))
    parts = []
    for i in range(shards):
        start, stop = shard_bounds(paths, i, shards)
        parts += _summary(read_tables(paths, SCHEMA, 32, start, stop))
    assert parts == whole
    # Keys number physical lines across tables, as count_lines counts them.
    lines = [count_lines(p) for p in paths]
    for key, _, line_no in whole:
        table = next(t for t in range(len(paths)) if key < sum(lines[:t + 1]))
        assert key == sum(lines[:table]) + line_no - 1


@settings(max_examples=40, deadline=None)
@given(tables=st.lists(st.lists(line, max_size=8), min_size=1, max_size=3),
       trailing=st.lists(st.booleans(), min_size=3, max_size=3), cut=st.integers(0, 30))
def test_resume_from_any_row(tmp_path_factory, tables, trailing, cut):
    """Reading from the position after row K gives the rows after K, keys included."""
    paths = _write(tmp_path_factory.mktemp("t"), tables, trailing)
    rows = list(read_tables(paths, SCHEMA, 32))
    if not rows:
        return
    k = min(cut, len(rows) - 1)
    resumed = list(read_tables(paths, SCHEMA, 32, TablePosition.from_json(rows[k].next.to_json())))
    assert _summary(resumed) == _summary(rows[k + 1:])


def test_over_long_line_is_a_row_error_in_its_shard(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("a\tb\n" + "z" * 100 + "\n" + "c\td\n")
    rows = list(read_tables([str(p)], SCHEMA, 16))
    assert [type(r.item) for r in rows] == [type(rows[0].item), RowError, type(rows[0].item)]


def test_shard_index_and_pipes_refused(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("a\tb\n")
    with pytest.raises(ConfigError, match="index"):
        shard_bounds([str(p)], 3, 3)
    with pytest.raises(ConfigError, match="regular files"):
        shard_bounds([str(tmp_path)], 0, 2)
