"""`clusterar serve`: a local web page to sample from one or more models side by side.

A person picks models, a class, CFG, temperatures (both CTF stages), top-k / top-p, CTF's stage 2 and a
seed, and sees a grid of samples per model (for CTF, the map of stage 1's coarse labels beside it). The
server is the standard library's threading HTTP server: the page (one HTML file shipped in the package,
no asset from the internet) is served at once while a sampling request runs, and the requests that sample
go through one lock, one at a time, in the order they came. Bad parameters come back as a message for the
page (HTTP 400 with {"error": ...}); nothing a request sends can stop the server.

    GET  /             the page
    GET  /api/models   the models: name, method, classes, image size, default sampling settings
    POST /api/sample   {"model", "label", "n", "seed", SampleSettings fields...} -> PNGs (base64) + timing
"""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
import traceback
from dataclasses import asdict, fields
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
                "source": pipe.source,
                "num_classes": pipe.num_classes,
                "class_names": pipe.class_names,
                "image_size": pipe.image_size,
                "defaults": asdict(pipe.settings()),
            }
            for name, pipe in self.models.items()
        ]

    def sample(self, request: dict) -> dict:
        """Check every parameter (a ClusterarError names the bad one), then sample under the lock."""
        if not isinstance(request, dict):
            raise ClusterarError("the request must be a JSON object")
        name = request.get("model")
        if name not in self.models:
            raise ClusterarError(f"unknown model {name!r}; served: {', '.join(self.models)}")
        pipe = self.models[name]
        label = _int(request, "label", 0, 0, pipe.num_classes - 1)
        n = _int(request, "n", 16, 1, MAX_IMAGES)
        seed = _int(request, "seed", 0, 0, 2**62)
        known = {f.name: f.type for f in fields(SampleSettings)}
        overrides = {}
        for key, value in request.items():
            if key in ("model", "label", "n", "seed"):
                continue
            if key not in known:
                raise ClusterarError(f"unknown parameter {key!r}")
            overrides[key] = _setting(key, value)
        if pipe.method != "ctf":
            overrides = {k: v for k, v in overrides.items() if k not in STAGE2_SETTINGS}
        settings = pipe.settings(**overrides)  # checks the values: "temperature must be > 0, got 0.0", ...
        with self.lock:
            t0 = time.perf_counter()
            tokens = pipe.sample_tokens([label] * n, seed, settings=settings)
            images = pipe.decode(tokens.ids).numpy()
            seconds = time.perf_counter() - t0
        scale = max(1, 64 // pipe.image_size)
        out = {
            "model": name,
            "label": label,
            "n": n,
            "seed": seed,
            "settings": asdict(settings),
            "seconds": round(seconds, 3),
            "image": _png(_grid(images, scale)),
        }
        if tokens.coarse is not None:
            maps = coarse_map(
                tokens.coarse.view(n, pipe.grid, pipe.grid), pipe.clusters.n_clusters, pipe.image_size
            )
            out["coarse"] = _png(_grid(maps, scale))
        return out


def _int(request: dict, key: str, default: int, lo: int, hi: int) -> int:
    value = request.get(key, default)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ClusterarError(f"{key} must be a whole number in [{lo}, {hi}], got {value!r}")
    return value


def _setting(key: str, value: Any) -> Any:
    """A SampleSettings value from the page: numbers may arrive as text."""
    if key == "stage2":
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ClusterarError(f"{key} must be a number, got {value!r}") from None
    if key in ("top_k", "top_k2"):
        if number != int(number):
            raise ClusterarError(f"{key} must be a whole number, got {value!r}")
        return int(number)
    return number


class _Handler(BaseHTTPRequestHandler):
    server: _Server

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
            self._json(404, {"error": f"no such page {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/api/sample":
            self._json(404, {"error": f"no such endpoint {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as e:
                raise ClusterarError(f"the request is not JSON: {e}") from None
            result = self.server.app.sample(request)
            print(
                f"{result['model']}: {result['n']} images of class {result['label']}, "
                f"seed {result['seed']}, {result['seconds']} s",
                flush=True,
            )
            self._json(200, result)
        except ClusterarError as e:
            self._json(400, {"error": str(e)})
        except Exception as e:  # a bug must not stop the server: say it on the page and in the terminal
            traceback.print_exc()
            self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: SampleServer):
        super().__init__(address, _Handler)
        self.app = app


def make_server(app: SampleServer, host: str = "127.0.0.1", port: int = 8000) -> _Server:
    """The HTTP server for `app` (port 0: any free port; `server.server_address` says which)."""
    try:
        return _Server((host, port), app)
    except OSError as e:
        raise ClusterarError(
            f"cannot listen on {host}:{port} ({e.strerror}); pass another --port (0 picks a free one)"
        ) from None


def serve(
    sources: list[str | Path], host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", **load_kw
) -> None:
    """Load the models, then serve the page until Ctrl-C."""
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
