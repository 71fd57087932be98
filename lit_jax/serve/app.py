"""The `serve` task: a local web page and its JSON API over one loaded decoder (FastAPI + uvicorn).

    python -m lit_jax.main --config=configs/serve.py --config.decoder=workdirs/smollm2_demo \
        --config.serve.steering='("workdirs/control/golden_gate_vectors",)'

Routes (JSON in and out; README "Web page and JSON API" gives examples):
  GET  /                 the page (lit_jax/serve/static/)
  GET  /api/info         decoder settings, loaded steering results, limits
  POST /api/read         {"dialog": [...]} or {"text": ...} (+ read_from_turn, span_start, span_end) -> read_id, tokens
  POST /api/ask          {"read_id", "questions": [...], "layer"?, "token"?} -> answers
  POST /api/token_scores {"read_id", "question", "layer"?} -> P(Yes) per span token
  POST /api/steer        {"prompt", "steering"} -> the target's reply without and with the steering

A refused request answers 400 {"error": "<field>: <why>", "field"}; too many waiting requests
503; a failure inside the model 500 {"error": "model error: ..."}, and the server keeps serving.
Model work runs one request at a time (Session.lock); the session names what may be read:
only the decoder and steering directories given at start, never a path from the browser.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Callable

from fastapi import Request  # at module level: the routes' string annotations resolve here

from lit_jax.serve.session import Limits, RequestError, Session

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
log = logging.getLogger("lit_jax.serve")


class _Queue:
    """Counts the requests that wait for or hold the model; refuses beyond `limit` (0: unlimited)."""

    def __init__(self, limit: int):
        self.limit, self.count, self._lock = limit, 0, threading.Lock()

    def __enter__(self):
        with self._lock:
            if self.limit and self.count >= self.limit:
                raise _Busy(self.count)
            self.count += 1

    def __exit__(self, *exc):
        with self._lock:
            self.count -= 1


class _Busy(Exception):
    def __init__(self, count: int):
        super().__init__(f"the server is busy: {count} requests are waiting for the model; try again shortly")


def create_app(session: Session, *, max_waiting: int = 32):
    """The FastAPI app serving `session` (see the module docstring). max_waiting: requests allowed
    to wait for or hold the model at once (503 beyond; 0: no limit)."""
    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="lit_jax serve", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    queue = _Queue(max_waiting)

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError):
        return JSONResponse({"error": str(e), "field": e.field}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        field = ".".join(str(x) for x in first.get("loc", ())[1:]) or "body"
        return JSONResponse({"error": f"{field}: {first.get('msg', 'malformed request')} (send a JSON object)",
                             "field": field}, status_code=400)

    @app.exception_handler(_Busy)
    async def busy(request: Request, e: _Busy):
        return JSONResponse({"error": str(e)}, status_code=503)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        log.exception("request %s failed", request.url.path)
        return JSONResponse({"error": f"model error: {type(e).__name__}: {e}"}, status_code=500)

    async def json_body(request: Request) -> Any:
        # The body is parsed as JSON whatever its Content-Type: `curl -d '{...}'` labels it as a form.
        raw = await request.body()
        try:
            return json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError("body", f"not valid JSON ({e}); send a JSON object") from None

    def queued(fn: Callable[[dict], dict], req: Any) -> dict:
        with queue:
            return fn(req)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    @app.get("/api/info")
    def info():
        out = session.info()
        return {**out, "limits": {**out["limits"], "max_waiting": max_waiting}}

    # Plain `def` routes run in FastAPI's thread pool; the session's lock makes them one model worker.
    @app.post("/api/read")
    def read(req: Any = Depends(json_body)):
        return queued(session.create_read, req)

    @app.post("/api/ask")
    def ask(req: Any = Depends(json_body)):
        return queued(session.ask, req)

    @app.post("/api/token_scores")
    def token_scores(req: Any = Depends(json_body)):
        return queued(session.token_scores, req)

    @app.post("/api/steer")
    def steer(req: Any = Depends(json_body)):
        return queued(session.steer, req)

    return app


def steering_names(paths) -> dict[str, str]:
    """{name: directory} for the steering results named at start: "name=dir" or "dir" (named by its
    last path component). ValueError naming --config.serve.steering for a repeated name."""
    out: dict[str, str] = {}
    for item in paths:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        name = name or os.path.basename(os.path.normpath(path))
        if name in out:
            raise ValueError(f"--config.serve.steering: the name {name!r} is given twice; write name=dir")
        out[name] = path
    return out


def limits_of(s) -> Limits:
    """Limits from the config's `serve` section (configs/serve.py). ValueError naming a flag below 1."""
    values = {k: int(s[k]) for k in Limits._fields}
    for k, v in values.items():
        if v < 1:
            raise ValueError(f"--config.serve.{k}={v}: must be at least 1")
    return Limits(**values)


def build_session(config) -> Session:
    """The Session a config names: its decoder (and step, target) and steering directories.
    Raises as load_decoder / load_steering do, naming the directory."""
    from lit_jax.lit.control import load_steering
    from lit_jax.lit.trained import load_decoder

    if not config.decoder:
        raise ValueError("--config.decoder is empty: give the work dir (or export) of a `lit` run")
    limits = limits_of(config.serve)
    named = steering_names(config.serve.steering)
    decoder = load_decoder(config.decoder, step=None if config.decoder_step < 0 else int(config.decoder_step),
                           target=config.target or None)
    steering = {name: load_steering(path, decoder.cfg) for name, path in named.items()}
    return Session(decoder, steering, limits, seed=int(config.seed))


def run_serve(config, workdir: str) -> None:
    """The `serve` task: load, then serve http://host:port/ until interrupted."""
    import uvicorn

    s = config.serve
    if not 0 < int(s.port) < 65536:
        raise ValueError(f"--config.serve.port={s.port}: must be in 1..65535")
    session = build_session(config)
    if s.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: serving on {s.host}: anyone who can reach this address can use the model", flush=True)
    print(f"lit_jax serve: decoder {session.decoder.path} (step {session.decoder.step}), steering "
          f"{sorted(session.steering) or 'none'}; open http://{s.host}:{s.port}/", flush=True)
    uvicorn.run(create_app(session, max_waiting=int(s.max_waiting)), host=s.host, port=int(s.port),
                log_level="warning")
