"""Every benchmark script runs with --tiny and prints its table, so the scripts never rot.
Timings here mean nothing (tiny model, shared machine); only that the scripts work is checked."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def test_input_benchmark_runs_tiny(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_input.py"), "--tiny", "--repeats", "1",
                             "--processes", "2", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for method in ("| threads |", "| processes, pickled crops |", "| processes, shared memory |",
                   "| processes, shared memory (predict) | 2 | 8 |"):
        assert method in result.stdout


def test_steady_rate_counts_whole_bursts_between_the_ends():
    """Bursts of 100 rows a second (a refill of captions of one length), each burst's rows written
    10 us apart: 100 rows/s, whatever the first and last tenth hold."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(BENCHMARKS))
    from bench_gpu import steady_window

    stamps = [5.0 + k + i * 1e-5 for k in range(20) for i in range(100)]  # start-up: 5 s
    stamps[-100:] = [s + 0.01 for s in stamps[-100:]]  # the last burst a little late: out of the window
    done = np.arange(1, len(stamps) + 1)
    start, end, rows = steady_window(stamps, done)
    assert rows / (end - start) == pytest.approx(100.0, rel=1e-3)
    assert steady_window(stamps[:100], done[:100]) is None  # one burst: no time between the ends


def test_gpu_busy_share_averages_the_samples_inside_the_window():
    pytest.importorskip("torch")
    sys.path.insert(0, str(BENCHMARKS))
    from datetime import datetime

    from bench_gpu import busy_share

    t0 = datetime(2026, 11, 27, 13, 47, 1).timestamp()
    lines = [f"{datetime.fromtimestamp(t0 + i / 10).strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]}, {v}"
             for i, v in enumerate([0, 100, 100, 50, 0])] + ["2026/11/27 13:47:02.000, [N/A]", "2026/11/2"]
    assert busy_share("\n".join(lines), t0 + 0.05, t0 + 0.35) == pytest.approx(250 / 3 / 100)
    assert busy_share("\n".join(lines), t0 + 9, t0 + 10) is None


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh --tiny falls back to the CPU where there is no CUDA: the script the
    lent GPU machine runs, checked here so that it never rots between loans."""
    env = {**os.environ, "OUT": str(tmp_path), "V2T_CHECK_INSTALL": "skip", "V2T_CHECK_SECONDS": "400"}
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--tiny", "--sections", "encoder,predict"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "End to end on cpu" in report and "v2t predict --backend torch-fast (fp32)" in report
    assert "| processes, shared memory (predict) |" in report  # step 2: the input pipeline alone
