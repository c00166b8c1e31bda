"""predict's input pipeline: frames decoded in worker processes give what threads give, the
workers leave signals to the job, a dead worker is a clear error the job resumes from, and the
job reports how long the model waited on its input."""
from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import TEST_SCHEMA, TINY_ARCH, run_cli
from v2t_engine.concurrency import worker_pool
from v2t_engine.errors import RowError
from v2t_engine.inputs.table_ranges import read_tables
from v2t_engine.inputs.tables import InputSchema, TableRow
from v2t_engine.jobs import predict as predict_module
from v2t_engine.jobs.journal import record_path
from v2t_engine.jobs import decoding
from v2t_engine.jobs.decoding import CropSlots, DecodePool, FrameDecoder, decoded_rows
from v2t_engine.jobs.predict import DecodeWorkerDied, PredictOptions, predict_tables


@pytest.fixture(scope="module")
def table(synth_data, tmp_path_factory):
    """The test clips with every kind of bad row mixed in: a line the reader rejects (too few
    columns: never sent to a worker), frames that are not a list, bad base64, a truncated JPEG,
    and a short clip that is padded."""
    rows = open(synth_data["test"], encoding="utf-8").read().splitlines()
    first = json.loads(rows[0].split("\t")[1])
    jpeg = base64.b64decode(first[0])
    bad = ["only-one-column",
           "notlist\tnot a frames list",
           "badb64\t" + json.dumps(["@@@@"]),
           "cut\t" + json.dumps([base64.b64encode(jpeg[:len(jpeg) // 2]).decode()]),
           "short\t" + json.dumps(first[:2])]
    lines = []
    for i, row in enumerate(rows):
        lines.append("\t".join(row.split("\t")[:2]))
        if i % 5 == 2:
            lines.append(bad[(i // 5) % len(bad)])
    path = tmp_path_factory.mktemp("pipeline") / "table.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def args(table, export, outputs, *extra):
    return ["predict", "--tables", table, "--outputs", outputs, "--checkpoint_dir", export,
            "--input_schema", TEST_SCHEMA, "--first_sequence", "imgbase64", "--micro_batch_size", 4, *extra]


def same_files(a, b):
    for suffix in ("", ".errors.tsv"):
        assert open(f"{a}{suffix}", "rb").read() == open(f"{b}{suffix}", "rb").read(), suffix


@pytest.fixture(scope="module")
def thread_run(table, random_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("threads") / "out.txt"
    run_cli(args(table, random_export, out, "--decode_processes", 0), expect_code=3)
    return out


def test_processes_decode_what_threads_decode(table, random_export, thread_run, tmp_path):
    out = tmp_path / "out.txt"
    result = run_cli(args(table, random_export, out, "--decode_processes", 2), expect_code=3)
    same_files(out, thread_run)
    errors = open(f"{out}.errors.tsv", encoding="utf-8").read()
    for reason in ("not a JSON list", "invalid base64", "truncated image"):
        assert reason in errors
    assert "input wait" in result.output


@pytest.mark.slow
def test_processes_given_several_rows_per_task_write_what_threads_write(table, random_export, tmp_path):
    """--micro_batch_size 16 on 2 processes reads 36 rows ahead: 4 rows per task."""
    outs = {}
    for processes in (0, 2):
        outs[processes] = tmp_path / f"out{processes}.txt"
        run_cli(args(table, random_export, outs[processes], "--decode_processes", processes,
                     "--micro_batch_size", 16), expect_code=3)
    same_files(outs[2], outs[0])


def test_decoded_rows_cross_processes(synth_data):
    """What a worker sends back pickles, a bad row's RowError included (an exception pickles as
    its message alone, which RowError cannot be rebuilt from)."""
    decode = pickle.loads(pickle.dumps(FrameDecoder("imgbase64", TINY_ARCH["frame_num"], TINY_ARCH["img_size"])))
    good = decode(TableRow(1, {"idx": "a", "imgbase64": open(synth_data["test"]).readline().split("\t")[1]}))
    bad = decode(TableRow(7, {"idx": "b", "imgbase64": "[1]"}))
    good2, bad2 = pickle.loads(pickle.dumps([good, bad]))
    assert good2.pixels.dtype == np.uint8 and np.array_equal(good2.pixels, good.pixels)
    assert good2.pixels.shape == (TINY_ARCH["frame_num"], 3, TINY_ARCH["img_size"], TINY_ARCH["img_size"])
    assert isinstance(bad2.error, RowError)
    assert (bad2.error.line_no, bad2.error.idx, bad2.error.reason) == (7, "b", bad.error.reason)


def test_decode_workers_leave_signals_to_the_job():
    """A Ctrl-C reaches every process of the terminal's group: the workers must outlive it, so
    the job can finish the rows in flight."""
    with worker_pool(1) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
        assert pool.submit(signal.getsignal, signal.SIGTERM).result() == signal.SIG_IGN
        pid = pool.submit(os.getpid).result()
        os.kill(pid, signal.SIGINT)
        time.sleep(0.2)
        assert pool.submit(os.getpid).result() == pid


def test_ctrl_c_to_the_process_group_drains_and_resumes(table, random_export, thread_run, tmp_path):
    out = tmp_path / "out.txt"
    cmd = [sys.executable, "-m", "v2t_engine.cli", *map(str, args(table, random_export, out, "--sync_interval", 0,
                                                                  "--decode_processes", 2))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group, as a terminal's foreground job
    deadline = time.monotonic() + 120
    while not os.path.exists(f"{out}.partial") or os.path.getsize(f"{out}.partial") == 0:
        assert time.monotonic() < deadline and proc.poll() is None, proc.poll()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "stopped by SIGINT" in stderr and "Traceback" not in stderr
    run_cli(args(table, random_export, out, "--resume"), expect_code=3)
    same_files(out, thread_run)


@dataclass(frozen=True)
class DieOnRow(FrameDecoder):
    """A decoder whose process dies on one row, as one killed for memory does. Top-level, so a
    worker process can unpickle it."""
    victim: str = ""

    def __call__(self, item):
        if isinstance(item, TableRow) and item.idx == self.victim:
            os._exit(1)
        return super().__call__(item)


def test_a_dead_decode_worker_stops_the_job_and_it_resumes(table, synth_data, random_export, thread_run,
                                                           monkeypatch, tmp_path):
    from v2t_engine.runtime.captioner import Captioner

    victim = open(synth_data["test"], encoding="utf-8").read().splitlines()[10].split("\t")[0]
    monkeypatch.setattr(FrameDecoder, "for_job", classmethod(
        lambda cls, opts, cfg: DieOnRow(opts.first_sequence, cfg.frame_num, cfg.img_size, opts.frame_source, victim)))
    out = tmp_path / "out.txt"
    opts = PredictOptions(tables=(str(table),), outputs=str(out), input_schema=InputSchema.parse(TEST_SCHEMA),
                          first_sequence="imgbase64", micro_batch_size=4, decode_processes=1, sync_interval=0)
    with pytest.raises(DecodeWorkerDied, match="--resume"):
        predict_tables(Captioner.load(random_export), opts, model_dir=random_export)
    assert record_path(out).exists()
    monkeypatch.undo()
    run_cli(args(table, random_export, out, "--resume", "--decode_processes", 0), expect_code=3)
    same_files(out, thread_run)


class SlowDecoder(FrameDecoder):
    def __call__(self, item):
        time.sleep(0.08)
        return super().__call__(item)


@pytest.mark.parametrize("slow", [False, True])
def test_the_job_reports_how_long_the_model_waited_for_input(synth_data, random_export, monkeypatch, tmp_path, slow):
    from v2t_engine.runtime.captioner import Captioner

    if slow:  # decoding far slower than the model: the model waits most of the time
        monkeypatch.setattr(FrameDecoder, "for_job", classmethod(
            lambda cls, opts, cfg: SlowDecoder(opts.first_sequence, cfg.frame_num, cfg.img_size)))
    opts = PredictOptions(tables=(str(synth_data["test"]),), outputs=str(tmp_path / "out.txt"),
                          input_schema=InputSchema.parse(TEST_SCHEMA), first_sequence="imgbase64",
                          micro_batch_size=4, workers=1, decode_processes=0)
    began = time.monotonic()
    report = predict_tables(Captioner.load(random_export), opts)
    assert 0 < report.input_wait_s < report.wall_s <= time.monotonic() - began
    assert f"input wait {report.input_wait_s / report.wall_s:.1%} of wall time" in report.summary()
    if slow:  # 24 rows, one thread: 1.9 s of sleeping alone, of which the model overlaps little
        assert report.input_wait_s > 0.8


def test_the_model_is_handed_uint8_crops(synth_data):
    """predict hands the model the crops as decoded, uint8: the backend normalizes them."""
    decode = FrameDecoder("imgbase64", TINY_ARCH["frame_num"], TINY_ARCH["img_size"])
    placed = read_tables([str(synth_data["test"])], InputSchema.parse(TEST_SCHEMA), 1 << 20)
    opts = PredictOptions(tables=(), outputs="x", input_schema=InputSchema.parse(TEST_SCHEMA),
                          first_sequence="imgbase64")
    with DecodePool(0, 1, decode.crop_shape) as pool:
        decoded = decoded_rows(pool, decode, placed, 4)
        videos = list(predict_module._videos(decoded, opts, SimpleNamespace(expect=lambda *a: None),
                                             predict_module.PredictReport(outputs="x"), SimpleNamespace(signal=None)))
    assert len(videos) == 24 and all(v[1].dtype == np.uint8 for v in videos)


def _table_rows(table) -> list[TableRow]:
    placed = read_tables([str(table)], InputSchema.parse(TEST_SCHEMA), 1 << 20)
    return [p.item for p in placed if isinstance(p.item, TableRow)]


@dataclass(frozen=True)
class LateOnEvenRows(FrameDecoder):
    """Rows finish out of input order: every other row takes a while longer."""

    def __call__(self, item):
        if isinstance(item, TableRow) and item.line_no % 2 == 0:
            time.sleep(0.05)
        return super().__call__(item)


def test_processes_hand_crops_back_through_shared_memory(table):
    """More rows than slots, all submitted and none consumed, finishing out of order: every one
    arrives (a slot is freed as its result arrives, not when the consumer reaches the row) with
    the crops a thread decodes, and every slot is free again at the end."""
    decode = LateOnEvenRows("imgbase64", TINY_ARCH["frame_num"], TINY_ARCH["img_size"])
    rows = _table_rows(table)
    with DecodePool(2, 0, decode.crop_shape, chunk=2) as pool:
        assert pool.slots.count == 12 and len(rows) > 2 * pool.slots.count
        futures = [pool.submit(decode, rows[i:i + 2]) for i in range(0, len(rows), 2)]
        got = [d for f in futures for d in f.result(timeout=120)]
        free = [pool.slots._free.get() for _ in range(pool.slots.count)]
        assert sorted(free) == list(range(pool.slots.count)) and pool.slots._free.empty()
    for row, d in zip(rows, got):
        want = decode(row)
        assert d.slot is None and (d.error is None) == (want.error is None), row.idx
        if want.error is None:
            assert d.pixels.dtype == np.uint8 and np.array_equal(d.pixels, want.pixels), row.idx
        else:
            assert d.error.reason == want.error.reason


def test_a_worker_writes_its_crops_to_a_slot(table):
    decode = FrameDecoder("imgbase64", TINY_ARCH["frame_num"], TINY_ARCH["img_size"])
    row = _table_rows(table)[0]
    with DecodePool(1, 0, decode.crop_shape) as pool:
        [raw] = pool.executor.submit(decoding._decode_into_slots, decode, [row]).result()
        assert raw.pixels is None and raw.slot is not None
        assert np.array_equal(pool.slots.take(raw.slot), decode(row).pixels)


def test_crops_that_fit_no_slot_come_back_pickled(table):
    """A decoder whose crops are not the slots' shape still works: its rows cross the pipe."""
    decode = FrameDecoder("imgbase64", TINY_ARCH["frame_num"], TINY_ARCH["img_size"])
    rows = _table_rows(table)[:4]
    wrong = (decode.frame_num + 1, *decode.crop_shape[1:])
    with DecodePool(1, 0, wrong) as pool:
        got = pool.submit(decode, rows).result(timeout=60)
    for row, d in zip(rows, got):
        assert np.array_equal(d.pixels, decode(row).pixels)


def test_crop_slots_pickle_only_to_starting_workers():
    """The shared memory's descriptor and queue go to workers as they start, never in a task
    (ForkingPickler: how a process pool sends tasks)."""
    from multiprocessing.reduction import ForkingPickler

    with pytest.raises(RuntimeError, match="inheritance"):
        ForkingPickler.dumps(CropSlots(2, (1, 3, 4, 4)))


@pytest.mark.parametrize("chunk", [3, 8])
def test_rows_decoded_a_chunk_per_task_keep_their_order_and_errors(table, chunk):
    """Processes given several rows per task, bad lines of the reader among them, hand back
    every row in input order, each with its place, as threads a row at a time do."""
    decode = FrameDecoder("imgbase64", TINY_ARCH["frame_num"], TINY_ARCH["img_size"])

    def rows(pool):
        placed = read_tables([str(table)], InputSchema.parse(TEST_SCHEMA), 1 << 20)
        return [(d.placed.item.line_no, None if d.error is None else (d.error.line_no, d.error.reason), d.pixels)
                for d in decoded_rows(pool, decode, placed, 4 * chunk)]

    with DecodePool(0, 2, decode.crop_shape) as pool:
        want = rows(pool)
    with DecodePool(2, 0, decode.crop_shape, chunk=chunk) as pool:
        got = rows(pool)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert any(w[1] is not None and "column" in w[1][1] for w in want)  # a reader's RowError
    for g, w in zip(got, want):
        assert (g[2] is None) == (w[2] is None) and (w[2] is None or np.array_equal(g[2], w[2]))


def test_large_crops_get_fewer_rows_per_task():
    """The slots' shared memory stays bounded: 16 frames of 336 px crops are 5.4 MB a row."""
    with DecodePool(3, 0, (16, 3, 336, 336), chunk=8) as pool:
        assert pool.chunk == decoding.SLOT_MEMORY // (8 * 16 * 3 * 336 * 336) == 6
        assert pool.slots.count == 8 * 6
    with DecodePool(3, 0, (4, 3, 224, 224), chunk=8) as pool:
        assert pool.chunk == 8


def test_rows_per_task():
    assert decoding.rows_per_task(2 * 1024 + 30, 15) == 8  # a GPU host's predict
    assert decoding.rows_per_task(2 * 4 + 4, 2) == 1  # a small job: every process gets rows
    assert decoding.rows_per_task(130, 1) == 8
