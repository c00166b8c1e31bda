"""`v2t serve`: a real server process on 127.0.0.1, real frames, real captions.

Every loop here is bounded in count and in time, and every connection goes to 127.0.0.1.
"""
import asyncio
import base64
import http.client
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from conftest import TEST_SCHEMA, run_cli

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

HOST = "127.0.0.1"
START_TIMEOUT = 90  # seconds for a server to load the model and answer /readyz


class Server:
    """`v2t serve` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, export_dir, log_path, *args):
        self.log_path = log_path
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "v2t_engine.cli", "-v", "serve", "--checkpoint_dir",
                                      str(export_dir), "--port", "0", *map(str, args)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.port = self._wait_for_port()
        self._wait_ready()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"http://127\.0\.0\.1:(\d+)", self.output())
            if found:
                return int(found.group(1))
            assert self.proc.poll() is None, f"server exited: {self.output()}"
            time.sleep(0.05)
        raise AssertionError(f"no port announced: {self.output()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.output()}"
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready: {self.output()}")

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def request(self, method, path, body=None, timeout=60):
        """(status, headers, parsed JSON or text)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            if body is not None and not isinstance(body, bytes):
                body = json.dumps(body).encode()
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            kind = resp.getheader("Content-Type", "")
            return resp.status, dict(resp.getheaders()), json.loads(data) if "json" in kind else data.decode()
        finally:
            conn.close()

    def caption(self, body):
        return self.request("POST", "/v1/captions", body)

    def metrics(self) -> dict[str, float]:
        status, _, text = self.request("GET", "/metrics")
        assert status == 200
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def held_out(random_export, synth_data, tmp_path_factory):
    """The test table's frames by idx, and the captions offline `v2t predict` writes for them."""
    out = tmp_path_factory.mktemp("serve_offline") / "pred.txt"
    run_cli(["predict", "--tables", synth_data["test"], "--outputs", out, "--checkpoint_dir", random_export,
             "--input_schema", TEST_SCHEMA, "--first_sequence", "imgbase64"])
    frames = {}
    for line in open(synth_data["test"], encoding="utf-8"):
        idx, field = line.rstrip("\n").split("\t")[:2]
        frames[idx] = json.loads(field)
    captions = {idx: json.loads(text) for idx, text in (line.rstrip("\n").split("\t") for line in open(out))}
    assert set(captions) == set(frames) and len(frames) >= 16
    return frames, captions


@pytest.fixture(scope="module")
def server(random_export, tmp_path_factory):
    srv = Server(random_export, tmp_path_factory.mktemp("serve") / "server.log", "--slots", 4,
                 "--max_queue", 256, "--max_body_bytes", 400_000, "--max_frames", 16,
                 "--max_image_pixels", 100_000)
    yield srv
    srv.stop()


def png_b64(width, height) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def bad_requests(frames):
    """(body, a piece of the reason the 400 must give)."""
    good = frames[0]
    return [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        ({"frames": []}, "non-empty list"),
        ({"frames": good, "colour": "red"}, "unknown field"),
        ({"frames": good, "max_generated_num": 0}, "max_generated_num"),
        ({"frames": good, "top_p": "high"}, "top_p"),
        ({"frames": ["!!!not base64!!!"]}, "invalid base64"),
        ({"frames": [good[0], base64.b64encode(b"hello, not an image").decode()]}, "frame 2: not an image"),
        ({"frames": [good[0]] * 17}, "max_frames"),
        ({"frames": [png_b64(400, 300)]}, "max_image_pixels"),
    ]


def test_concurrent_clients_get_offline_captions_and_bad_requests_get_400(server, held_out):
    frames, offline = held_out
    bad = bad_requests(list(frames.values()))
    jobs = [("good", idx) for idx in sorted(frames)]
    for i in range(len(bad)):  # interleaved with the good ones
        jobs.insert(3 * i + 1, ("bad", i))

    def send(job):
        kind, key = job
        if kind == "good":
            return job, server.caption({"frames": frames[key], "idx": key})
        return job, server.caption(bad[key][0])

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, jobs))
    for (kind, key), (status, _, body) in answers:
        if kind == "good":
            assert status == 200, body
            assert body == {"captions": offline[key], "idx": key}
        else:
            assert status == 400, body
            assert bad[key][1] in body["error"]
    assert server.request("GET", "/readyz")[0] == 200


def test_batch_form_and_candidates(server, held_out):
    frames, offline = held_out
    idxs = sorted(frames)[:3]
    status, _, body = server.caption({"videos": [{"frames": frames[i], "idx": i} for i in idxs]})
    assert status == 200, body
    assert body == {"results": [{"captions": offline[i], "idx": i} for i in idxs]}
    status, _, body = server.caption({"frames": frames[idxs[0]], "max_generated_num": 3})
    assert status == 200 and body == {"captions": offline[idxs[0]] * 3}
    status, _, body = server.caption({"videos": [{"frames": frames[idxs[0]]}, {"frames": ["%%%"]}]})
    assert status == 400 and body["error"].startswith("videos[1]: frame 1: invalid base64"), body


def test_limits_on_body_and_method(server):
    status, _, body = server.caption(b"{" + b" " * 500_000 + b"}")
    assert status == 413 and "max_body_bytes" in body["error"]
    assert server.request("GET", "/v1/captions")[0] == 405
    status, _, body = server.request("GET", "/healthz")
    assert status == 200 and body == {"status": "ok"}


def test_metrics_count_what_happened(server, held_out):
    frames, _ = held_out
    before = server.metrics()
    good = list(frames.values())[:5]
    for f in good:
        assert server.caption({"frames": f})[0] == 200
    for body in ({"frames": ["@@"]}, {"frames": ["@@"]}, b"[", b"x" * 500_001):
        assert server.caption(body)[0] in (400, 413)
    after = server.metrics()

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('v2t_requests_total{code="200"}') == 5
    assert delta('v2t_requests_total{code="400"}') == 3
    assert delta('v2t_requests_total{code="413"}') == 1
    assert delta('v2t_request_errors_total{kind="bad_frames"}') == 2
    assert delta('v2t_request_errors_total{kind="bad_request"}') == 1
    assert delta('v2t_request_errors_total{kind="too_large"}') == 1
    assert delta("v2t_request_latency_seconds_count") == 5
    assert delta("v2t_videos_completed_total") == 5
    assert delta("v2t_decoder_steps_total") > 0
    assert 0 < delta("v2t_decoder_busy_slot_steps_total") <= 4 * delta("v2t_decoder_steps_total")
    assert after["v2t_batch_slots"] == 4 and after["v2t_queue_depth"] == 0
    assert after["v2t_requests_in_progress"] == 0


def test_per_request_sampling_is_its_own_whatever_the_batch(server, held_out):
    frames, _ = held_out
    idxs = sorted(frames)
    ask = {"frames": frames[idxs[0]], "do_sample": True, "top_k": 5, "seed": 7, "max_generated_num": 3}
    status, _, alone = server.caption(ask)
    assert status == 200 and len(alone["captions"]) == 3
    crowd = [{"frames": frames[i], "do_sample": True, "seed": n} for n, i in enumerate(idxs[1:9])]
    with ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(server.caption, [*crowd[:4], ask, *crowd[4:]]))
    assert all(status == 200 for status, _, _ in answers)
    assert answers[4][2] == alone  # same seed, same samples, whatever ran beside it
    status, _, body = server.caption({**ask, "temperature": -1})
    assert status == 400 and "temperature" in body["error"]


def test_embedding_api_from_threads_and_coroutines(random_export, held_out):
    from v2t_engine.errors import ServiceClosed
    from v2t_engine.serve import CaptionService

    frames, offline = held_out
    idxs = sorted(frames)[:10]
    with CaptionService.load(random_export, slots=3, max_queue=64) as service:
        pixels = {i: service.decode_frames(frames[i]) for i in idxs}
        with ThreadPoolExecutor(8) as pool:
            by_thread = dict(zip(idxs, pool.map(lambda i: service.submit(pixels[i]).result(30), idxs)))

        async def all_at_once():
            return await asyncio.gather(*(service.caption(pixels[i], timeout=30) for i in idxs))

        by_coroutine = dict(zip(idxs, asyncio.run(all_at_once())))
        assert by_thread == by_coroutine == {i: offline[i] for i in idxs}
    with pytest.raises(ServiceClosed):
        service.submit(pixels[idxs[0]])


def test_embedding_api_refuses_when_full_and_drains_on_close(random_export, held_out):
    from v2t_engine.errors import ConfigError, ServiceOverloaded
    from v2t_engine.runtime.search import SearchOptions
    from v2t_engine.serve import CaptionService

    frames, offline = held_out
    idx = sorted(frames)[0]
    service = CaptionService.load(random_export, slots=1, max_queue=2)
    pixels = service.decode_frames(frames[idx])
    with pytest.raises(ConfigError, match="2 decoder slots"):
        service.submit(pixels, SearchOptions(do_sample=True, num_return=2))
    accepted = []
    with pytest.raises(ServiceOverloaded, match="queue is full"):
        for _ in range(1000):  # one slot drains far slower than this loop fills a queue of 2
            accepted.append(service.submit(pixels))
    assert service.close(drain=True, timeout=60)
    assert [f.result(0) for f in accepted] == [offline[idx]] * len(accepted)
    assert service.stats().completed == len(accepted)


def test_missing_serve_extra_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what an install without the extra sees
    result = run_cli(["serve", "--checkpoint_dir", tmp_path], expect_code=1)
    assert result.output.strip() == ("Error: v2t serve needs uvicorn, which is not installed: "
                                     "pip install 'v2t[serve]'")


def test_a_model_that_fails_to_load_stops_the_server(tmp_path):
    result = run_cli(["serve", "--checkpoint_dir", tmp_path, "--port", 0], expect_code=1)
    assert "the model failed to load" in result.output and str(tmp_path) in result.output


@pytest.fixture
def small_server(random_export, tmp_path):
    """One decoder slot and a short queue: easy to overload, slow to drain."""
    srv = Server(random_export, tmp_path / "server.log", "--slots", 1, "--max_queue", 16)
    yield srv
    srv.stop()


@pytest.mark.slow
def test_flood_beyond_the_queue_gets_429_and_accepted_requests_complete(small_server, held_out):
    frames, offline = held_out
    idxs = (sorted(frames) * 3)[:64]
    start = threading.Barrier(len(idxs), timeout=30)

    def send(idx):
        start.wait()
        return idx, small_server.caption({"frames": frames[idx], "idx": idx})

    with ThreadPoolExecutor(len(idxs)) as pool:
        answers = list(pool.map(send, idxs))
    refused = [(s, h) for _, (s, h, _) in answers if s != 200]
    assert refused, "64 simultaneous requests never filled a queue of 16 behind one slot"
    assert all(s == 429 and int(h["retry-after"]) >= 1 for s, h in refused), refused[:3]
    for idx, (status, _, body) in answers:
        if status == 200:
            assert body["captions"] == offline[idx]
    metrics = small_server.metrics()
    assert metrics['v2t_request_errors_total{kind="overloaded"}'] == len(refused)
    assert metrics["v2t_videos_completed_total"] == len(answers) - len(refused)
    assert small_server.caption({"frames": frames[idxs[0]]})[0] == 200  # still serving


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight_and_takes_no_new_ones(small_server, held_out):
    frames, offline = held_out
    idxs = sorted(frames)[:8]
    batch = {"videos": [{"frames": frames[i], "idx": i} for i in idxs]}  # 8 captions in turn on 1 slot
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(small_server.caption, batch) for _ in range(2)]
        deadline = time.monotonic() + 30
        while small_server.metrics()["v2t_requests_in_progress"] < 2:
            assert time.monotonic() < deadline and not any(p.done() for p in pending), "requests never overlapped"
            time.sleep(0.005)
        small_server.proc.send_signal(signal.SIGTERM)
        answers = [p.result(timeout=60) for p in pending]
    for status, _, body in answers:
        assert status == 200, body
        assert body == {"results": [{"captions": offline[i], "idx": i} for i in idxs]}
    # uvicorn ends the process by the signal it drained for (older versions exit 0)
    assert small_server.proc.wait(30) in (0, -signal.SIGTERM)
    with pytest.raises(ConnectionRefusedError):
        small_server.request("GET", "/healthz", timeout=5)
    assert "draining:" in small_server.output()
