"""`clusterar serve`: a local web page to sample from one or more models side by side.

A person picks models, a class, CFG, temperatures (both CTF stages), top-k / top-p, CTF's stage 2 and a
seed, and sees a grid of samples per model (for CTF, the map of stage 1's coarse labels beside it). The
server is the standard library's threading HTTP server: the page (one HTML file shipped in the package,
no asset from the internet) is served at once while a sampling request runs, and the requests that sample
go through one lock, one at a time, in the order they came. Bad parameters come back as a message for the
page (HTTP 400 with {"error": ...}); nothing a request sends can stop the server.

    GET  /             the page
    GET  /api/models   the models: name, method, classes, image size, default sampling settings (no paths:
                       the page uses name, method, num_classes and class_names)
    POST /api/sample   {"model", "label", "n", "seed", SampleSettings fields...} -> PNGs (base64) + timing

Whatever a request sends is checked before it reaches a model (`parse_request`): bad JSON, a wrong type, a
value out of range or one that overflows float32 in the logits maths gets HTTP 400 with a message; a body
without a length gets 411, one over MAX_BODY 413. A client that goes away mid-answer is not an error.
"""

from __future__ import annotations

import base64
import errno
import io
import json
import logging
import math
import re
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ClusterarError
from .model_file import MODEL_FILE
from .sample import STAGE2_SETTINGS, Pipeline, SampleSettings
from .viz import image_grid

PAGE = Path(__file__).parent / "web" / "index.html"
MAX_IMAGES = 64  # per request: a grid a person looks at, not a dataset
MAX_BODY = 64 * 1024  # bytes of a request body: a sampling request is a few hundred
SOCKET_TIMEOUT = 60.0  # seconds a client may take to send its request: a stalled one frees its thread
log = logging.getLogger(__name__)


def _name(source: str | Path, taken: set[str]) -> str:
    """A short unique name for a model: its run folder or file name."""
    p = Path(source)
    base = p.parent.name if p.name in (MODEL_FILE, "pipeline.json") else (p.stem if p.suffix else p.name)
    name, i = base or "model", 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def _png(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def coarse_map(coarse: torch.Tensor, n_clusters: int, side: int) -> np.ndarray:
    """CTF's coarse labels [B, g, g] as colour images [B, side, side, 3] (uint8): one colour per cluster,
    hues spread by the golden ratio so that clusters with near ids look different."""
    ids = torch.arange(n_clusters, dtype=torch.float64)
    hue = (ids * 0.6180339887) % 1.0
    import matplotlib.colors as mcolors

    hsv = torch.stack([hue, 0.55 + 0.35 * ((ids * 0.37) % 1.0), 0.65 + 0.3 * ((ids * 0.71) % 1.0)], 1)
    palette = (mcolors.hsv_to_rgb(hsv.numpy()) * 255).round().astype(np.uint8)
    maps = palette[coarse.cpu().numpy()]  # [B, g, g, 3]
    scale = max(1, side // coarse.shape[-1])
    return maps.repeat(scale, axis=1).repeat(scale, axis=2)


def _grid(images: np.ndarray | torch.Tensor, scale: int) -> Any:
    t = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2)
    return image_grid(t, nrow=math.ceil(math.sqrt(t.shape[0])), scale=scale)


class SampleServer:
    """The models and the one lock that sampling goes through; `sample` turns a request into PNGs."""

    def __init__(self, sources: list[str | Path], device: str | torch.device = "cpu", **load_kw: Any):
        if not sources:
            raise ClusterarError("serve needs at least one model: a run folder, model file or pipeline JSON")
        self.models: dict[str, Any] = {}
        for src in sources:
            self.models[_name(src, set(self.models))] = Pipeline.load(src, device=device, **load_kw)
        self.lock = threading.Lock()

    def describe(self) -> list[dict]:
        return [
            {
                "name": name,
                "method": pipe.method,
                "num_classes": pipe.num_classes,
                "class_names": pipe.class_names,
                "image_size": pipe.image_size,
                "defaults": asdict(pipe.settings()),
            }
            for name, pipe in self.models.items()
        ]

    def sample(self, request: Any) -> dict:
        """Check every parameter of `request` (JSON bytes, a dict or a SampleRequest; a RequestError names
        the bad one), then sample under the lock."""
        r = request if isinstance(request, SampleRequest) else parse_request(request, self.models)
        pipe, n = self.models[r.model], r.n
        with self.lock:
            t0 = time.perf_counter()
            # eager: each request runs on its own thread, and CUDA graphs would be recorded again per thread
            tokens = pipe.sample_tokens([r.label] * n, r.seed, settings=r.settings, compile=False)
            images = pipe.decode(tokens.ids).numpy()
            seconds = time.perf_counter() - t0
        scale = max(1, 64 // pipe.image_size)
        out = {
            "model": r.model,
            "label": r.label,
            "n": n,
            "seed": r.seed,
            "settings": asdict(r.settings),
            "seconds": round(seconds, 3),
            "image": _png(_grid(images, scale)),
        }
        if tokens.coarse is not None:
            maps = coarse_map(
                tokens.coarse.view(n, pipe.grid, pipe.grid), pipe.clusters.n_clusters, pipe.image_size
            )
            out["coarse"] = _png(_grid(maps, scale))
        return out


class RequestError(ClusterarError):
    """A request the server refuses: `status` is its HTTP code (400 unless said)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class SampleRequest:
    """One checked sampling request."""

    model: str
    label: int
    n: int
    seed: int
    settings: SampleSettings


_WHOLE = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: str.isdigit() also takes "²"
_SHOW = 60  # characters of a bad value echoed in a message


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


def parse_json(body: bytes) -> Any:
    """A request body as JSON; anything else (bad bytes, bad syntax, nesting past the parser's depth) is a
    RequestError, never a traceback."""
    try:
        return json.loads(body or b"{}")
    except RecursionError:
        raise RequestError("the request is not JSON: nested too deep") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise RequestError(f"the request is not JSON: {e}") from None


def _int(request: dict, key: str, default: int, lo: int, hi: int) -> int:
    value = request.get(key, default)
    if isinstance(value, str) and _WHOLE.fullmatch(value.strip()) and len(value) <= 40:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"{key} must be a whole number in [{lo}, {hi}], got {_show(value)}")
    return value


def _number(key: str, value: Any) -> float:
    """A finite float from a JSON number or its text (the page sends text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or len(str(value)) > 40:
        raise RequestError(f"{key} must be a number, got {_show(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise RequestError(f"{key} must be a number, got {_show(value)}") from None
    if not math.isfinite(number):
        raise RequestError(f"{key} must be a finite number, got {_show(value)}")
    return number


def _setting(key: str, value: Any) -> Any:
    """A SampleSettings value from the page: numbers may arrive as text."""
    if key == "stage2":
        if not isinstance(value, str):
            raise RequestError(f"stage2 must be text, got {_show(value)}")
        return value
    number = _number(key, value)
    if key in ("top_k", "top_k2"):
        if number != int(number):
            raise RequestError(f"{key} must be a whole number, got {_show(value)}")
        return int(number)
    return number


def parse_request(request: Any, models: dict[str, Any]) -> SampleRequest:
    """A request (JSON bytes or the parsed object) -> a SampleRequest, every field checked for type and
    range against the model it names; a RequestError (HTTP 400) names the first bad field."""
    if isinstance(request, (bytes, bytearray)):
        request = parse_json(bytes(request))
    if not isinstance(request, dict):
        raise RequestError("the request must be a JSON object")
    name = request.get("model")
    if not isinstance(name, str) or name not in models:
        raise RequestError(f"unknown model {_show(name)}; served: {', '.join(models)}")
    pipe = models[name]
    label = _int(request, "label", 0, 0, pipe.num_classes - 1)
    n = _int(request, "n", 16, 1, MAX_IMAGES)
    seed = _int(request, "seed", 0, 0, 2**62)
    known = {f.name for f in fields(SampleSettings)}
    overrides = {}
    for key, value in request.items():
        if key in ("model", "label", "n", "seed"):
            continue
        if key not in known:
            raise RequestError(f"unknown parameter {_show(key)}")
        overrides[key] = _setting(key, value)
    if pipe.method != "ctf":
        overrides = {k: v for k, v in overrides.items() if k not in STAGE2_SETTINGS}
    settings = pipe.settings(**overrides)  # SampleSettings' checks: ranges, and values that overflow float32
    return SampleRequest(name, label, n, seed, settings)


def _gone(exc: BaseException | None) -> bool:
    """A client that closed its socket or stalled past SOCKET_TIMEOUT: its loss, not the server's error."""
    return isinstance(exc, (ConnectionError, TimeoutError))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = SOCKET_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per sample, below
        pass

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path in ("/", "/index.html"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/api/models":
            self._json(200, self.server.app.describe())
        else:
            self._json(404, {"error": f"no such page {_show(self.path)}"})

    def _body(self) -> bytes:
        """The request body, read only when its length is declared, a number and at most MAX_BODY."""
        if self.headers.get("Transfer-Encoding"):
            raise RequestError("send the request with a Content-Length header, not chunked", 411)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("the request needs a Content-Length header", 411)
        if not re.fullmatch(r"[0-9]{1,20}", length.strip()):
            raise RequestError(f"Content-Length must be a whole number of bytes >= 0, got {_show(length)}")
        size = int(length)
        if size > MAX_BODY:
            raise RequestError(f"the request body is {size} bytes; at most {MAX_BODY} are read", 413)
        body = self.rfile.read(size)
        if len(body) < size:
            raise RequestError(f"the request body ended after {len(body)} of its {size} bytes")
        return body

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/api/sample":
            self.close_connection = True  # the body is not read
            self._json(404, {"error": f"no such endpoint {_show(self.path)}"})
            return
        try:
            result = self.server.app.sample(self._body())
            print(
                f"{result['model']}: {result['n']} images of class {result['label']}, "
                f"seed {result['seed']}, {result['seconds']} s",
                flush=True,
            )
            self._json(200, result)
        except ClusterarError as e:  # the page shows the message; the terminal stays quiet
            status = getattr(e, "status", 400)
            self.close_connection = self.close_connection or status != 400  # a body left unread
            self._json(status, {"error": str(e)})
        except Exception as e:  # a bug must not stop the server: say it on the page and in the terminal
            if _gone(e):
                raise  # the client went away: _Server.handle_error keeps it to one debug line
            traceback.print_exc()
            self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: SampleServer):
        super().__init__(address, _Handler)
        self.app = app

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (BrokenPipe, ConnectionReset, a stalled socket) is one debug line, not a
        traceback in the terminal; anything else is reported as socketserver does."""
        exc = sys.exc_info()[1]
        if _gone(exc):
            log.debug("client %s went away: %s", client_address, exc)
            return
        super().handle_error(request, client_address)


def check_address(host: Any, port: Any) -> None:
    """`--host` and `--port` before any model is loaded: a port in [0, 65535], a host that resolves."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ClusterarError(
            f"--port must be a whole number in [0, 65535] (0 picks a free one), got {port!r}"
        )
    if not isinstance(host, str):
        raise ClusterarError(f"--host must be an address such as 127.0.0.1, got {host!r}")
    try:
        socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as e:
        raise ClusterarError(
            f"--host {host!r} is not an IPv4 address or name of this machine ({getattr(e, 'strerror', None) or e}); "
            "pass --host 127.0.0.1 (this machine only) or 0.0.0.0 (every network)"
        ) from None


def make_server(app: SampleServer, host: str = "127.0.0.1", port: int = 8000) -> _Server:
    """The HTTP server for `app` (port 0: any free port; `server.server_address` says which)."""
    check_address(host, port)
    try:
        return _Server((host, port), app)
    except OSError as e:
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            raise ClusterarError(
                f"cannot listen on {host}:{port} ({e.strerror}); --host must be an address of this machine: "
                "pass --host 127.0.0.1 (this machine only) or 0.0.0.0 (every network)"
            ) from None
        raise ClusterarError(
            f"cannot listen on {host}:{port} ({e.strerror}); pass another --port (0 picks a free one)"
        ) from None


def serve(
    sources: list[str | Path], host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", **load_kw
) -> None:
    """Check the address, load the models, then serve the page until Ctrl-C."""
    check_address(host, port)
    app = SampleServer(sources, device=device, **load_kw)
    server = make_server(app, host, port)
    h, p = server.server_address[:2]
    print(f"serving {', '.join(app.models)} on http://{h}:{p}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
