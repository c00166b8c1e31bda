"""The Ray path (v2t_engine.ray) on a local Ray instance (slow tier: starting Ray alone takes\nseconds): the same OUTPUTS and errors file as local
`v2t predict`, byte for byte, and no row lost or duplicated when a caption worker is killed."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_SCHEMA, run_cli

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'v2t[ray]'")
pytest.importorskip("ray.data", reason="the ray extra is not installed: pip install 'v2t[ray]'")

BAD_ROWS = [
    "bad_b64\t[\"!!!not base64!!!\"]",
    "not_image\t[\"aGVsbG8gd29ybGQ=\"]",
    "missing_column",
]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


def mixed_tables(synth_data, tmp_path, copies=1):
    """Two tables: the synthetic test rows (times `copies`) with bad rows among them (one of
    invalid UTF-8, which must keep its line number), and a short second table."""
    good = Path(synth_data["test"]).read_bytes().splitlines() * copies
    bad = [b.encode() for b in BAD_ROWS] + [b"bad_utf8\t\xff\xfe"]
    lines = good[:3] + bad[:2] + good[3:10] + [b""] + bad[2:] + good[10:]
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_bytes(b"\n".join(lines) + b"\n")
    second.write_bytes(b"\n".join(good[:5]) + b"\n")
    return [first, second]


def local_predict(tables, out, export_dir, *extra):
    run_cli(["predict", "--tables", ",".join(map(str, tables)), "--outputs", out, "--checkpoint_dir", export_dir,
             "--input_schema", TEST_SCHEMA, "--first_sequence", "imgbase64", *extra], expect_code=3)


def ray_options(tables, out, **fields):
    from v2t_engine.inputs.tables import InputSchema
    from v2t_engine.jobs.predict import PredictOptions

    return PredictOptions(tables=tuple(map(str, tables)), outputs=str(out), input_schema=InputSchema.parse(TEST_SCHEMA),
                          **fields)


def test_read_task_gives_the_rows_numbers_and_errors_of_the_local_reader(synth_data, tmp_path):
    """No cluster: what each read task yields over its byte range, laid end to end, is the
    local reader's rows, with the global line numbers that key seeded sampling."""
    from v2t_engine.inputs.table_ranges import read_tables
    from v2t_engine.inputs.tables import InputSchema
    from v2t_engine.ray import ERROR, IDX, KEY, LINE, TablesSource

    tables = [str(t) for t in mixed_tables(synth_data, tmp_path)]
    schema = InputSchema.parse(TEST_SCHEMA)
    source = TablesSource(tables, schema, parts=4)
    got = [row for part in range(4) for block in source._blocks(part) for row in block.to_pylist()]
    want = list(read_tables(tables, schema, 1 << 30))
    assert [(r[KEY], r[LINE], r[IDX], r[ERROR]) for r in got] == \
        [(p.key, p.item.line_no, p.item.idx, getattr(p.item, "reason", None)) for p in want]
    assert [r["imgbase64"] for r in got if r[ERROR] is None] == [p.item.fields["imgbase64"] for p in want
                                                                if not hasattr(p.item, "reason")]
    assert len(source.get_read_tasks(1)) == 4


SAMPLED = ["--do_sample", "--top_k", "5", "--seed", "7", "--user_defined_parameters", "max_generated_num=2"]


@pytest.mark.slow
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampling"])
def test_ray_output_equals_local_predict(local_ray, random_export, synth_data, tmp_path, sampled):
    from v2t_engine.ray import RayOptions, predict_tables_ray
    from v2t_engine.runtime.search import SearchOptions

    tables = mixed_tables(synth_data, tmp_path)
    local_predict(tables, tmp_path / "local.txt", random_export, "--append_cols", "idx", *(SAMPLED if sampled else []))
    search = SearchOptions(do_sample=True, top_k=5, seed=7, num_return=2) if sampled else SearchOptions()
    # Small batches, so the job spans several read ranges, decode tasks and caption calls.
    counted = []
    report = predict_tables_ray(str(random_export),
                                ray_options(tables, tmp_path / "ray.txt", append_cols=("idx",), search=search),
                                cluster=RayOptions(rows_per_batch=5, decode_rows_per_batch=3, read_parts=3),
                                progress=counted.append)
    for suffix in ("", ".errors.tsv"):
        local = (tmp_path / f"local.txt{suffix}").read_bytes()
        assert (tmp_path / f"ray.txt{suffix}").read_bytes() == local, suffix
    errors = (tmp_path / "ray.txt.errors.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert [e.split("\t")[:2] for e in errors] == [["4", "bad_b64"], ["5", "not_image"], ["14", "missing_column"],
                                                  ["15", "bad_utf8"]]
    assert (report.written, report.failed, report.exit_code) == (24 + 5, 4, 3)
    assert sum(counted) == report.written + report.failed


@pytest.mark.slow
def test_ray_on_error_fail_names_the_row_and_leaves_nothing(local_ray, random_export, synth_data, tmp_path):
    from v2t_engine.jobs.predict import StoppedAtBadRow
    from v2t_engine.ray import predict_tables_ray

    tables = mixed_tables(synth_data, tmp_path)
    out = tmp_path / "out.txt"
    with pytest.raises(StoppedAtBadRow, match="line 4 .*bad_b64"):
        predict_tables_ray(str(random_export), ray_options(tables, out, on_error="fail"))
    assert not out.exists() and not (tmp_path / "out.txt.partial").exists()


@pytest.mark.slow
def test_ray_checks_options_on_the_driver(local_ray, random_export, synth_data, tmp_path):
    from v2t_engine.errors import ConfigError, TableError
    from v2t_engine.ray import predict_tables_ray

    with pytest.raises(TableError, match="missing.txt"):
        predict_tables_ray(str(random_export), ray_options([tmp_path / "missing.txt"], tmp_path / "o.txt"))
    with pytest.raises(ConfigError, match="text_len=999"):
        predict_tables_ray(str(random_export), ray_options([synth_data["test"]], tmp_path / "o.txt", text_len=999))


def caption_worker_pids():
    """Processes of live caption actors (Ray titles an actor's process after its class)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ray::" in cmdline and b"CaptionActor" in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker process through /proc")
def test_killed_caption_worker_loses_and_duplicates_no_row(local_ray, random_export, synth_data, tmp_path):
    from v2t_engine.ray import RayOptions, predict_tables_ray

    tables = mixed_tables(synth_data, tmp_path, copies=3)
    local_predict(tables, tmp_path / "local.txt", random_export)
    killed, written, restarted = [], [], set()

    def progress(n):
        # Once some rows are written and more are in flight, kill -9 the caption worker; then
        # watch for the worker Ray starts in its place.
        written.append(n)
        if killed and len(written) % 4 == 0:
            restarted.update(set(caption_worker_pids()) - set(killed))
        if len(written) == 10 and not killed:
            pids = caption_worker_pids()
            assert pids, "no caption worker process found"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)

    predict_tables_ray(str(random_export), ray_options(tables, tmp_path / "ray.txt"),
                       cluster=RayOptions(rows_per_batch=4, decode_rows_per_batch=4), progress=progress)
    assert killed and restarted, "the caption worker was not killed, or not restarted, during the job"
    for suffix in ("", ".errors.tsv"):
        assert (tmp_path / f"ray.txt{suffix}").read_bytes() == (tmp_path / f"local.txt{suffix}").read_bytes()


def test_missing_ray_is_one_line_naming_the_extra():
    code = ("import sys; sys.modules['ray'] = None\n"
            "from v2t_engine.errors import MissingDependencyError\n"
            "try:\n    import v2t_engine.ray\n"
            "except MissingDependencyError as err:\n    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "predicting on Ray needs ray, which is not installed: pip install 'v2t[ray]'"]


@pytest.mark.slow
def test_benchmark_script_runs_tiny(tmp_path):
    """benchmarks/bench_ray.py with --tiny, so the script never rots (its timings mean nothing here)."""
    pytest.importorskip("torch")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ray.py"
    result = subprocess.run([sys.executable, str(script), "--tiny", "--rows", "6", "--repeats", "1",
                             "--workdir", str(tmp_path), "--frame-size", "48x40"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Ray on one machine vs local predict" in result.stdout and "target" in result.stdout
    assert "outputs identical: True" in result.stdout
