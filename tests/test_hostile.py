"""Issue 13's failures, each through the real command (`v2t predict`, `v2t make-table`) or the real
save: hostile frame paths, paths that leave the root, a 100 MB line and 10,000 frames in a row,
a full disk, two writers, a damaged export, oversized videos, a checkpoint save on a full disk,
and an over-long line in lazy training data. Every outcome is a reported row or one clean error
line, never a traceback; good rows are captioned, in order, as they would be alone."""
import base64
import contextlib
import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_SCHEMA, run_cli

S_CLI = ["--input_schema", TEST_SCHEMA, "--first_sequence", "imgbase64", "--micro_batch_size", 4]


def first_rows(synth_data, n):
    """The first n rows of the synthetic test table: (idx, [frame bytes, ...])."""
    rows = []
    with open(synth_data["test"], encoding="utf-8") as f:
        for line, _ in zip(f, range(n)):
            idx, field = line.rstrip("\n").split("\t")[:2]
            rows.append((idx, [base64.b64decode(b) for b in json.loads(field)]))
    return rows


def b64_line(idx, frames):
    return f"{idx}\t{json.dumps([base64.b64encode(f).decode() for f in frames])}\n"


def predict(model, table, out, params="", expect_code=0, extra=()):
    args = ["predict", "--tables", table, "--outputs", out, "--checkpoint_dir", model, *S_CLI, *extra]
    if params:
        args += ["--user_defined_parameters", params]
    result = run_cli(args, expect_code=expect_code)
    assert "Traceback" not in result.output
    return result


def outputs(path):
    return [line.split("\t") for line in Path(path).read_text(encoding="utf-8").splitlines()]


def errors(out):
    lines = Path(f"{out}.errors.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return {idx: reason for _, idx, reason in (line.split("\t", 2) for line in lines)}


@pytest.fixture(scope="module")
def reference(random_export, synth_data, tmp_path_factory):
    """Captions of the first 6 test rows on their own (base64): what every good row must get."""
    tmp = tmp_path_factory.mktemp("reference")
    rows = first_rows(synth_data, 6)
    (tmp / "t.txt").write_text("".join(b64_line(i, f) for i, f in rows), encoding="utf-8")
    predict(random_export, tmp / "t.txt", tmp / "out.txt")
    return rows, {idx: caption for idx, caption in outputs(tmp / "out.txt")}


def check_good_rows(out, expected_idx, reference):
    got = outputs(out)
    assert [idx for idx, _ in got] == expected_idx  # every good row, in input order
    assert all(caption == reference[1][idx] for idx, caption in got)


# ---------------------------------------------------------------------------------------------
# Frame paths


def frame_tree(tmp_path, rows):
    root = tmp_path / "frames"
    for idx, frames in rows:
        (root / idx).mkdir(parents=True)
        for k, data in enumerate(frames):
            (root / idx / f"{k}.jpg").write_bytes(data)
    return root


def paths_line(idx, entries):
    return f"{idx}\t{json.dumps(entries)}\n"


def test_hostile_frame_paths_are_reported_and_never_read(random_export, reference, tmp_path):
    """/dev/zero, a FIFO, a 3 GB sparse file and a link loop, with allow_outside_root=true so that
    only the file checks stand between them and a read."""
    rows = reference[0][:3]
    root = frame_tree(tmp_path, rows)
    os.mkfifo(root / "fifo")
    with open(root / "sparse.jpg", "wb") as f:
        f.truncate(3 << 30)  # 3 GB that take no disk
    (root / "loop").symlink_to(root / "loop")
    good = [[f"{idx}/{k}.jpg" for k in range(len(frames))] for idx, frames in rows]
    table = tmp_path / "t.txt"
    table.write_text(paths_line(rows[0][0], good[0]) + paths_line("zero", ["/dev/zero"] * 4)
                     + paths_line("fifo", ["fifo"]) + paths_line(rows[1][0], good[1])
                     + paths_line("sparse", ["sparse.jpg"]) + paths_line("loop", ["loop"])
                     + paths_line(rows[2][0], good[2]), encoding="utf-8")
    out = tmp_path / "out.txt"
    predict(random_export, table, out, f"enable_img_path=true img_root_dir={root} allow_outside_root=true",
            expect_code=3)
    check_good_rows(out, [idx for idx, _ in rows], reference)
    reasons = errors(out)
    assert reasons["zero"] == "frame 1: image path '/dev/zero' is not a regular file (a directory, device or FIFO)"
    assert reasons["fifo"] == "frame 1: image path 'fifo' is not a regular file (a directory, device or FIFO)"
    assert reasons["sparse"] == ("frame 1: image file 'sparse.jpg' has 3221225472 bytes, over the limit of "
                                 "50000000 (max_image_bytes)")
    assert reasons["loop"] == "frame 1: cannot read image file 'loop' (a loop of symbolic links)"


def test_paths_leaving_the_root_are_row_errors(random_export, reference, tmp_path):
    rows = reference[0][:2]
    root = frame_tree(tmp_path, rows)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(rows[0][1][0])  # a readable image outside the root
    (root / "link.jpg").symlink_to(secret)
    good = [[f"{idx}/{k}.jpg" for k in range(len(frames))] for idx, frames in rows]
    table = tmp_path / "t.txt"
    table.write_text(paths_line("dotdot", ["../secret.jpg"]) + paths_line(rows[0][0], good[0])
                     + paths_line("absolute", [str(secret)]) + paths_line("etc", ["/etc/passwd"])
                     + paths_line("link", ["link.jpg"]) + paths_line("deep", [f"{rows[0][0]}/../../secret.jpg"])
                     + paths_line(rows[1][0], good[1]), encoding="utf-8")
    out = tmp_path / "out.txt"
    predict(random_export, table, out, f"enable_img_path=true img_root_dir={root}", expect_code=3)
    check_good_rows(out, [idx for idx, _ in rows], reference)
    reasons = errors(out)
    assert set(reasons) == {"dotdot", "absolute", "etc", "link", "deep"}
    assert all("leaves img_root_dir (allow_outside_root=true reads it)" in r for r in reasons.values())


# ---------------------------------------------------------------------------------------------
# Huge rows


def tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), 7).save(buf, "PNG")
    return buf.getvalue()


def test_a_100_mb_line_and_10000_frames_in_a_row(random_export, reference, tmp_path):
    rows = reference[0][:3]
    table = tmp_path / "t.txt"
    with open(table, "w", encoding="utf-8") as f:
        f.write(b64_line(*rows[0]))
        f.write('huge\t["')
        for _ in range(100):
            f.write("A" * 1_000_000)
        f.write('"]\n')
        f.write(b64_line(*rows[1]))
        f.write(b64_line("many", [tiny_png()] * 10_000))
        f.write(b64_line(*rows[2]))
    out = tmp_path / "out.txt"
    predict(random_export, table, out, "max_row_bytes=4000000", expect_code=3)
    check_good_rows(out, [idx for idx, _ in rows], reference)
    assert errors(out) == {"huge": "row longer than 4000000 bytes (max_row_bytes); skipped unread",
                           "many": "10000 frames listed, over the limit of 1024 (max_row_frames)"}


# ---------------------------------------------------------------------------------------------
# Output faults


@contextlib.contextmanager
def tiny_disk(where: Path, free_bytes: int):
    """A tmpfs mounted at `where` with about `free_bytes` left (filled up by a filler file); skips
    the test where mounting is not allowed."""
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC tests cover the path")
    try:
        with open(where / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        data = (where / "filler").read_bytes()
        (where / "filler").write_bytes(data[:len(data) - free_bytes])
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_a_really_full_disk_is_one_line_and_keeps_the_finished_rows(random_export, reference, synth_data, tmp_path):
    """Rows carry their frames (--append_cols) so that a few fill the 64 KB left on the disk."""
    with tiny_disk(tmp_path / "disk", free_bytes=64 << 10) as disk:
        out = disk / "out.txt"
        result = predict(random_export, synth_data["test"], out, expect_code=1, extra=["--append_cols", "imgbase64"])
        lines = result.output.strip().splitlines()
        assert lines[-1] == (f"Error: cannot write {out}.partial: No space left on device; the rows finished "
                             f"before this are kept in {out}.partial")
        kept = outputs(f"{out}.partial")
        assert not out.exists() and len(kept) > 1
        whole = kept[:-1]  # the last line may be cut where the disk filled up
        assert [row[0] for row in whole] == [row[0] for row in outputs(synth_data["test"])[:len(whole)]]
        assert all(row[1] == reference[1][row[0]] for row in whole if row[0] in reference[1])


def test_a_full_disk_on_the_error_report_is_one_line(random_export, reference, tmp_path, monkeypatch):
    from v2t_engine.inputs.writer import ErrorReport

    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ErrorReport, "add", full)
    table = tmp_path / "t.txt"
    table.write_text(b64_line(*reference[0][0]) + "bad\tnot json\n", encoding="utf-8")
    result = predict(random_export, table, tmp_path / "out.txt", expect_code=1)
    assert result.output.strip() == (f"Error: cannot write {tmp_path / 'out.txt.errors.tsv'}: No space left on "
                                     f"device; the rows finished before this are kept in {tmp_path / 'out.txt.partial'}")


def test_two_writer_processes_and_a_stale_lock(random_export, synth_data, tmp_path):
    out = tmp_path / "out.txt"
    holder = ("import sys, time; from v2t_engine.inputs.writer import TableOutput, TableReport; "
              f"job = TableOutput(TableReport({str(out)!r})).__enter__(); print('locked', flush=True); time.sleep(120)")
    first = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        (tmp_path / "out.txt.partial").write_text("row of the running job\n", encoding="utf-8")
        for flags in ([], ["--overwrite"]):  # not even --overwrite may touch a running job's output
            result = predict(random_export, synth_data["test"], out, expect_code=1, extra=flags)
            assert f"Error: another v2t job is writing {out}" in result.output
        assert (tmp_path / "out.txt.partial").read_text(encoding="utf-8") == "row of the running job\n"
    finally:
        first.kill()  # no clean-up runs: the lock file stays behind, stale
        first.wait()
        first.stdout.close()
    assert (tmp_path / "out.txt.lock").exists()
    predict(random_export, synth_data["test"], out, extra=["--overwrite"])
    assert len(outputs(out)) == 24 and not (tmp_path / "out.txt.lock").exists()


# ---------------------------------------------------------------------------------------------
# Damaged exports


def damaged(random_export, tmp_path, damage):
    broken = tmp_path / f"export-{uuid.uuid4().hex[:6]}"
    shutil.copytree(random_export, broken)
    damage(broken)
    return broken


def manifest_edit(edit):
    def apply(directory):
        data = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        edit(data)
        (directory / "manifest.json").write_text(json.dumps(data), encoding="utf-8")
    return apply


def cut(name, keep):
    def apply(directory):
        (directory / name).write_bytes((directory / name).read_bytes()[:keep])
    return apply


def truncated_and_manifest_agreeing(directory):
    """A truncated graph whose manifest entry was edited to agree on its size."""
    cut("decode.onnx", 1000)(directory)
    manifest_edit(lambda m: m["files"]["decode.onnx"].update(bytes=1000))(directory)


@pytest.mark.parametrize("damage,verify,message", [
    (cut("decode.onnx", 1000), False, r"decode.onnx is 1000 bytes, the manifest says \d+"),
    (cut("frame_encoder.onnx", 0), False, r"frame_encoder.onnx is 0 bytes, the manifest says \d+"),
    (cut("manifest.json", 50), False, r"manifest.json is not valid JSON"),
    (manifest_edit(lambda m: m["files"]["decode.onnx"].update(sha256="0" * 64)), True,
     r"decode.onnx does not have the SHA-256 the manifest records"),
    (manifest_edit(lambda m: m["files"]["tokenizer.json"].update(bytes=1)), False,
     r"tokenizer.json is \d+ bytes, the manifest says 1"),
    (truncated_and_manifest_agreeing, True, r"decode.onnx does not have the SHA-256"),
    (truncated_and_manifest_agreeing, False, r"decode.onnx"),
], ids=["cut-decode", "empty-encoder", "cut-manifest", "edited-sha", "edited-size", "agreeing-verify",
        "agreeing-no-verify"])
def test_a_damaged_export_is_one_error_naming_the_file(random_export, synth_data, tmp_path, damage, verify, message):
    import re

    broken = damaged(random_export, tmp_path, damage)
    result = predict(broken, synth_data["test"], tmp_path / "out.txt", expect_code=1,
                     extra=["--verify"] if verify else [])
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and re.search(message, last), result.output


# ---------------------------------------------------------------------------------------------
# Videos


def test_videos_over_the_caps_are_reported_before_decoding(tmp_path):
    av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    from test_videos import index_image, write_video

    clips = tmp_path / "clips"
    clips.mkdir()
    write_video(clips / "a_short.mp4", [index_image(i) for i in range(10)])  # 0.4 s
    write_video(clips / "b_long.mp4", [index_image(i % 200) for i in range(100)])  # 4 s, declared
    noise = np.random.default_rng(0).integers(0, 256, (30, 48, 64, 3), dtype=np.uint8)
    write_video(clips / "c_big.mkv", list(noise), codec="mpeg4")  # noise: far more bytes than the others
    with av.open(str(clips / "d_undeclared.h264"), "w", format="h264") as container:  # no duration anywhere
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(100):
            for packet in stream.encode(av.VideoFrame.from_ndarray(index_image(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    listing = tmp_path / "list.txt"
    os.mkfifo(tmp_path / "fifo.mp4")
    listing.write_text("\n".join([*(str(p) for p in sorted(clips.iterdir())), "/dev/zero", str(tmp_path / "fifo.mp4"),
                                  "x" * 70_000]) + "\n", encoding="utf-8")
    limit = max((clips / name).stat().st_size for name in ("a_short.mp4", "b_long.mp4", "d_undeclared.h264"))
    assert (clips / "c_big.mkv").stat().st_size > limit
    out = tmp_path / "t.txt"
    result = run_cli(["make-table", "--videos", listing, "--outputs", out, "--workers", 1,
                      "--max_video_bytes", limit, "--max_video_seconds", 2], expect_code=3)
    assert "Traceback" not in result.output
    assert [row.split("\t")[0] for row in out.read_text(encoding="utf-8").splitlines()] == [str(clips / "a_short.mp4")]
    reasons = {Path(idx).name: reason.split(": ", 1)[-1] for idx, reason in errors(out).items()}
    assert reasons["b_long.mp4"] == "declares 4 s, over the limit of 2 s (max_video_seconds)"
    assert reasons["c_big.mkv"].endswith(f"bytes, over the limit of {limit} (max_video_bytes)")
    assert reasons["d_undeclared.h264"] == "runs past the limit of 2 s (max_video_seconds); read no further"
    assert reasons["zero"] == reasons["fifo.mp4"] == "is not a regular file (a device, FIFO or socket)"
    assert reasons["list.txt line 7"] == "listed path is longer than 65536 characters; skipped unread"


# ---------------------------------------------------------------------------------------------
# Training: checkpoints and lazy data


def test_a_checkpoint_save_on_a_full_disk_keeps_the_previous_one(random_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import safetensors.torch
    from v2t_engine.errors import OutputError
    from v2t_training.checkpoint import load_model, save_checkpoint

    model, tokenizer = load_model(random_checkpoint)
    ck = tmp_path / "ck"
    save_checkpoint(ck, model, tokenizer, training_state={"step": 1}, trainer_state={"step": 1})
    before = {p.name: p.read_bytes() for p in ck.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OutputError) as info:
        save_checkpoint(ck, model, tokenizer, training_state={"step": 2}, trainer_state={"step": 2})
    assert str(info.value) == (f"cannot save the checkpoint in {ck}: writing model.safetensors failed: No space "
                               "left on device; the previous checkpoint there is unchanged")
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directory left


def test_a_checkpoint_save_on_a_really_full_disk(random_checkpoint, tmp_path):
    pytest.importorskip("torch")
    from v2t_engine.errors import OutputError
    from v2t_training.checkpoint import load_model, save_checkpoint

    model, tokenizer = load_model(random_checkpoint)
    with tiny_disk(tmp_path / "disk", free_bytes=0) as disk:
        with pytest.raises(OutputError, match=rf"cannot save the checkpoint in {disk / 'ck'}: writing \S+ failed: "):
            save_checkpoint(disk / "ck", model, tokenizer, training_state={"step": 1})
        assert sorted(p.name for p in disk.iterdir()) == ["ck", "filler"] and not any((disk / "ck").iterdir())


def test_lazy_training_data_skips_an_over_long_line_unread(synth_data, tmp_path, caplog):
    pytest.importorskip("torch")
    from v2t_engine.inputs.tables import InputSchema
    from v2t_engine.tokenizer import CaptionTokenizer
    from v2t_training.data import CaptionDataset, DataSpec

    lines = Path(synth_data["train"]).read_text(encoding="utf-8").splitlines(keepends=True)[:4]
    table = tmp_path / "train.txt"
    with open(table, "w", encoding="utf-8") as f:
        f.writelines(lines[:2])
        f.write("huge\t[\"" + "A" * 3_000_000 + "\"]\tcaption\n")
        f.writelines(lines[2:])
    schema = InputSchema.parse("idx:str:1,imgbase64:str:1,text:str:1")
    tokenizer = CaptionTokenizer.train(line.split("\t")[2].strip() for line in lines)
    spec = DataSpec("imgbase64", "text", frame_num=2, img_size=32, text_len=16, max_row_bytes=1 << 20)
    data = CaptionDataset(table, schema, spec, tokenizer, cache_budget_bytes=0)  # lazy: offsets only
    assert not data.cached and data.line_nos == [1, 2, 4, 5]
    assert [(e.line_no, e.idx, e.reason) for e in data.bad_rows] == [
        (3, "huge", "row longer than 1048576 bytes (max_row_bytes); skipped unread")]
    frames, tokens = data[2]  # line 4, read from its remembered offset
    assert frames.shape == (2, 3, 32, 32) and tokens.shape == (16,)


# ---------------------------------------------------------------------------------------------
# The corpus script


@pytest.mark.slow
def test_the_hostile_corpus_script_passes_on_a_small_corpus(random_export, tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "hostile_corpus.py"
    result = subprocess.run([sys.executable, str(script), "--checkpoint_dir", str(random_export), "--work",
                             str(tmp_path / "corpus"), "--rows", "6", "--videos", "2", "--huge_mb", "40"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = [line.split()[-1] for line in result.stdout.splitlines()[2:] if not line.startswith("    ")]
    runs = 3 if importlib.util.find_spec("av") else 2
    assert verdicts == ["ok"] * runs, result.stdout
