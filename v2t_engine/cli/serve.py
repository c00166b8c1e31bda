"""`v2t serve`: captions over HTTP (v2t_engine/serve), on uvicorn.

Registered as an entry point of ``v2t.commands`` like train and export, and importable without
the `serve` extra: the web stack is imported when the command runs, and its absence is one line
naming the install."""
from __future__ import annotations

import socket
from pathlib import Path

import click

from ..errors import ArtifactError, ConfigError, import_optional
from .options import checkpoint_dir_option, device_option, easynlp_option

SERVE_INSTALL = "pip install 'v2t[serve]'"


def _positive(kind):
    return click.IntRange(min=1) if kind is int else click.FloatRange(min=0, min_open=True)


@click.command("serve")
@checkpoint_dir_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to bind (0: any free port; the one taken is logged).")
@click.option("--slots", type=_positive(int), default=8, show_default=True,
              help="Decoder slots of the continuous batch (videos captioned together).")
@click.option("--max_queue", "--max-queue", type=_positive(int), default=128, show_default=True,
              help="Videos that may wait for a slot (decoding or queued); beyond it, 429.")
@click.option("--timeout", "timeout_s", type=_positive(float), default=60.0, show_default=True,
              help="Seconds from a request's arrival to its captions; beyond it, 504.")
@click.option("--max_body_bytes", "--max-body-bytes", type=_positive(int), default=32 * 1024 * 1024,
              show_default=True)
@click.option("--max_frames", "--max-frames", type=_positive(int), default=64, show_default=True,
              help="Frames one video may list (only the model's frame_num are decoded).")
@click.option("--max_videos", "--max-videos", type=_positive(int), default=64, show_default=True,
              help="Videos in one batch request.")
@click.option("--max_image_pixels", "--max-image-pixels", type=_positive(int), default=16_000_000,
              show_default=True, help="Width x height a frame may declare; larger ones are refused undecoded.")
@click.option("--max_image_bytes", "--max-image-bytes", type=_positive(int), default=8 * 1024 * 1024,
              show_default=True)
@click.option("--max_candidates", "--max-candidates", type=_positive(int), default=16, show_default=True,
              help="Largest max_generated_num a request may ask for.")
@easynlp_option("workers", type=_positive(int), default=2, show_default=True,
                help="Threads decoding frames.")
@click.option("--backend", default="auto", show_default=True, help="Backend name (see v2t predict --help).")
@device_option
@click.option("--threads", type=_positive(int), default=None, help="Intra-op threads (default: all cores).")
@click.option("--verify", is_flag=True, help="Check the SHA-256 of every export file before serving.")
@click.option("--access_log", "--access-log", is_flag=True, help="Log every request (uvicorn's access log).")
def serve_command(checkpoint_dir, host, port, slots, max_queue, timeout_s, max_body_bytes, max_frames,
                  max_videos, max_image_pixels, max_image_bytes, max_candidates, workers, backend, device,
                  threads, verify, access_log):
    """Serve captions over HTTP: POST /v1/captions, GET /healthz, /readyz, /metrics.

    \b
    Example:
      v2t serve --checkpoint_dir export/ --port 8000
      curl -s localhost:8000/v1/captions -H 'content-type: application/json' \\
        -d '{"frames": ["<base64 jpeg>", "..."]}'

    Concurrent requests share one continuous batch of --slots decoder rows. SIGTERM (or Ctrl-C)
    stops taking requests and finishes those in flight before exiting.
    """
    uvicorn = import_optional("uvicorn", "v2t serve", SERVE_INSTALL)
    if not Path(checkpoint_dir).is_dir():
        raise ArtifactError(f"{checkpoint_dir} is not a directory (expected an export or a checkpoint)")
    from ..serve.app import ServeState, create_app
    from ..serve.requests import ServeLimits
    from ..serve.service import CaptionService

    limits = ServeLimits(max_body_bytes=max_body_bytes, max_frames=max_frames, max_videos=max_videos,
                         max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
                         max_candidates=max_candidates, timeout_s=timeout_s)
    state = ServeState(lambda: CaptionService.load(checkpoint_dir, slots=slots, max_queue=max_queue,
                                                   backend=backend, device=device, threads=threads,
                                                   verify=verify),
                       limits=limits, workers=workers)
    app = create_app(state)
    # Graceful shutdown waits for the requests in flight, each bounded by its timeout.
    config = uvicorn.Config(app, log_level="info", access_log=access_log, timeout_graceful_shutdown=int(timeout_s) + 5,
                            lifespan="on")
    server = _DrainingServer(config, state)
    state.on_fatal = lambda _message: setattr(server, "should_exit", True)
    sock = _bind(host, port)
    click.echo(f"v2t serve: http://{_url_host(host)}:{sock.getsockname()[1]} (loading {checkpoint_dir})", err=True)
    server.run(sockets=[sock])
    if state.load_error is not None:
        raise click.ClickException(f"the model failed to load: {state.load_error}")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that --port 0 can report the port it got."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, marking the app not ready as soon as a shutdown signal arrives (before
        uvicorn stops taking connections and waits for those in flight)."""

        def __init__(self, config, state):
            super().__init__(config)
            self.state = state

        def handle_exit(self, sig, frame):
            self.state.draining = True
            super().handle_exit(sig, frame)

    return DrainingServer


def _DrainingServer(config, state):
    return _draining_server_class()(config, state)
