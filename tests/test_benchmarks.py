"""Every benchmark script runs with --tiny and prints its table, so the scripts never rot.
Timings here mean nothing (tiny model, shared machine); only that the scripts work is checked."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Shared by the scripts, so the tiny model is exported once per precision."""
    return tmp_path_factory.mktemp("bench")


@pytest.mark.slow
@pytest.mark.parametrize("script, args, title", [
    ("bench_decoder.py", ["--batch-sizes", "1,8"], "Decoder: greedy captions"),
    ("bench_encoder.py", [], "Frame encoder"),
    ("bench_predict.py", ["--rows", "4", "--rss-rows", "2", "--batch-size", "2", "--frame-size", "48x40"],
     "End to end"),
    ("bench_serve.py", ["--rows", "8", "--requests", "8", "--concurrency", "1,8", "--slots", "2",
                        "--frame-size", "48x40"], "Serving: requests/s and latency"),
])
def test_benchmark_script_runs_tiny(script, args, title, workdir):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--tiny", "--repeats", "1",
                             "--workdir", str(workdir), *args],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert title in result.stdout
    assert "| --- |" in result.stdout and "target" in result.stdout
