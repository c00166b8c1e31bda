"""Resume after kill -9 / SIGTERM, shards and their merge: the finished OUTPUTS and
OUTPUTS.errors.tsv are byte-identical to an uninterrupted run's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TEST_SCHEMA, run_cli
from v2t_engine.jobs.journal import record_path


@pytest.fixture(scope="module")
def tables(synth_data, tmp_path_factory):
    """Two tables of the test clips with bad rows and blank lines mixed in (line numbers then
    differ from row numbers, and the second table's restart at 1)."""
    rows = open(synth_data["test"], encoding="utf-8").read().splitlines()
    root = tmp_path_factory.mktemp("resume_tables")
    paths = []
    for t, n in enumerate((70, 40)):
        lines = []
        for i in range(n):
            idx, frames = rows[(i * 7 + t) % len(rows)].split("\t")[:2]
            lines.append(f"t{t}v{i}\t{frames}")
            if i % 17 == 5:
                lines.append(f"t{t}bad{i}\tnot a frames list")
            if i % 23 == 9:
                lines.append("")
        path = root / f"part{t}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(str(path))
    return ",".join(paths)


SHARD_EXIT = 3  # every shard of these tables holds a bad row


def args(tables, export, outputs, *extra):
    return ["predict", "--tables", tables, "--outputs", outputs, "--checkpoint_dir", export,
            "--input_schema", TEST_SCHEMA, "--micro_batch_size", 4, *extra]


@pytest.fixture(scope="module")
def clean_run(tables, random_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out.txt"
    run_cli(args(tables, random_export, out), expect_code=3)
    return out


def same_files(a, b):
    for suffix in ("", ".errors.tsv"):
        assert open(f"{a}{suffix}", "rb").read() == open(f"{b}{suffix}", "rb").read(), suffix


def start(cli_args):
    cmd = [sys.executable, "-m", "v2t_engine.cli", *map(str, cli_args)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_progress(outputs, rows, proc, timeout=120):
    """Until the job record says at least `rows` rows are durable."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(record_path(outputs).read_text())["progress"]["written"] >= rows:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    pytest.fail(f"the job did not reach {rows} rows (exit {proc.poll()})")


@pytest.mark.parametrize("kill_after", [1, pytest.param(45, marks=pytest.mark.slow)])
def test_kill_9_then_resume_equals_a_clean_run(tables, random_export, clean_run, tmp_path, kill_after):
    out = tmp_path / "out.txt"
    proc = start(args(tables, random_export, out, "--sync_interval", 0))
    wait_for_progress(out, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # A torn last line, as a power cut can leave: cut off on resume with the rest after the record.
    with open(f"{out}.partial", "ab") as f:
        f.write(b"t0v99\t[\"half a capt")
    result = run_cli(args(tables, random_export, out), expect_code=1)
    assert "--resume" in result.output and "--overwrite" in result.output
    run_cli(args(tables, random_export, out, "--resume"), expect_code=3)
    same_files(out, clean_run)
    assert not record_path(out).exists() and not os.path.exists(f"{out}.partial")


def test_sigterm_finishes_the_batch_and_says_how_to_resume(tables, random_export, clean_run, tmp_path):
    out = tmp_path / "out.txt"
    proc = start(args(tables, random_export, out, "--sync_interval", 0))
    wait_for_progress(out, 10, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    record = json.loads(record_path(out).read_text())
    assert not record["complete"] and record["progress"]["written"] >= 10
    run_cli(args(tables, random_export, out, "--resume"), expect_code=3)
    same_files(out, clean_run)


def interrupted(tables, export, out):
    """An interrupted job: its record and partial output, as SIGTERM leaves them."""
    proc = start(args(tables, export, out, "--sync_interval", 0))
    wait_for_progress(out, 5, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


@pytest.mark.slow
def test_resume_refuses_a_changed_job(tables, random_export, random_checkpoint, tmp_path):
    out = tmp_path / "out.txt"
    interrupted(tables, random_export, out)
    result = run_cli(args(tables, random_export, out, "--resume", "--output_format", "easynlp"), expect_code=1)
    assert "option output_format changed" in result.output
    result = run_cli(args(tables, random_export, out, "--resume", "--do_sample", "--seed", 1), expect_code=1)
    assert "option search.do_sample changed" in result.output
    result = run_cli(args(tables, random_checkpoint, out, "--resume"), expect_code=1)
    assert "the model changed" in result.output
    first = tables.split(",")[0]
    os.utime(first, ns=(0, 0))
    result = run_cli(args(tables, random_export, out, "--resume"), expect_code=1)
    assert f"input table {first} changed" in result.output
    result = run_cli(args(tables.split(",")[1], random_export, out, "--resume"), expect_code=1)
    assert "the input tables changed" in result.output
    assert os.path.exists(f"{out}.partial")  # refusing keeps the work
    result = run_cli(args(tables, random_export, out, "--resume", "--overwrite"), expect_code=2)
    run_cli(args(tables, random_export, out, "--overwrite"), expect_code=3)


# slow: four predict jobs and a merge, ~4 s; the fast tier checks that shards tile the tables
# (test_table_ranges.py).
@pytest.mark.slow
@pytest.mark.parametrize("sampling", [(), ("--do_sample", "--top_k", 5, "--seed", 11)], ids=["greedy", "seeded"])
def test_four_shards_merge_into_the_single_run(tables, random_export, tmp_path, sampling):
    whole = tmp_path / "whole.txt"
    run_cli(args(tables, random_export, whole, *sampling), expect_code=3)
    shards = [tmp_path / f"shard{i}.txt" for i in range(4)]
    for i, shard in enumerate(shards):
        run_cli(args(tables, random_export, shard, "--shard", f"{i}/4", *sampling), expect_code=SHARD_EXIT)
    merged = tmp_path / "merged.txt"
    result = run_cli(["merge-shards", "--outputs", merged, *reversed(shards)], expect_code=3)
    assert "merged" in result.output
    same_files(merged, whole)


@pytest.mark.slow
def test_merge_refuses_missing_duplicate_and_foreign_shards(tables, random_export, tmp_path):
    shards = [tmp_path / f"shard{i}.txt" for i in range(3)]
    for i, shard in enumerate(shards):
        run_cli(args(tables, random_export, shard, "--shard", f"{i}/3"), expect_code=SHARD_EXIT)
    merged = tmp_path / "merged.txt"
    result = run_cli(["merge-shards", "--outputs", merged, shards[0], shards[2]], expect_code=1)
    assert "shards 1/3 are missing" in result.output
    result = run_cli(["merge-shards", "--outputs", merged, shards[0], shards[0], shards[1]], expect_code=1)
    assert "given twice" in result.output
    other = tmp_path / "other.txt"
    run_cli(args(tables, random_export, other, "--shard", "1/3", "--output_format", "easynlp"), expect_code=SHARD_EXIT)
    result = run_cli(["merge-shards", "--outputs", merged, shards[0], other, shards[2]], expect_code=1)
    assert "another job" in result.output
    with open(shards[1], "ab") as f:
        f.write(b"extra\trow\n")
    result = run_cli(["merge-shards", "--outputs", merged, *shards], expect_code=1)
    assert "holds" in result.output and not merged.exists()
