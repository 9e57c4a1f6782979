"""The dashboard web app: a static page, read-only JSON endpoints and a server-sent-events stream.

Starlette + uvicorn (already part of Dagster's webserver stack, so nothing heavy is added). Only GET
routes exist: the dashboard can look at everything and change nothing. Blocking S3/Kafka reads run
in the thread pool; one :class:`Collector` serves every client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from workers import late
from workers.config import Settings
from workers.dashboard.collector import Collector, View
from workers.errors import KappaError

STATIC = resources.files("workers.dashboard") / "static"
SECTIONS = ("results", "processor", "dlq", "lag", "replays", "diff", "causes")


def dumps(data: Any) -> str:
    return json.dumps(data, default=str, separators=(",", ":"))


class Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content).encode()


def error(message: str, status: int = 400) -> Response:
    return Json({"error": message}, status_code=status)


def create_app(settings: Settings, interval: float = 2.0) -> Starlette:
    """The ASGI app; ``interval`` is the SSE push period in seconds."""
    collector = Collector(settings, interval)

    async def snapshot(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(collector.snapshot, View.parse(dict(request.query_params)))

    async def index(_request: Request) -> Response:
        return FileResponse(str(STATIC / "index.html"), headers={"Cache-Control": "no-cache"})

    async def full(request: Request) -> Response:
        return Json(await snapshot(request))

    def section(name: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            data = await snapshot(request)
            return Json({"view": data["view"], name: data[name]})

        return endpoint

    async def health(_request: Request) -> Response:
        return Json({"ok": True, "bucket": settings.s3_bucket, "events_topic": settings.events_topic})

    async def stream(request: Request) -> Response:
        view = View.parse(dict(request.query_params))  # a bad parameter fails now, as a 400

        async def events() -> AsyncIterator[str]:
            yield "retry: 3000\n\n"
            while not await request.is_disconnected():
                data = await run_in_threadpool(collector.snapshot, view)
                yield f"event: snapshot\ndata: {dumps(data)}\n\n"
                await asyncio.sleep(interval)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def kappa_error(_request: Request, exc: Exception) -> Response:
        return error(str(exc))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        collector.close()

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/health", health, methods=["GET"]),
        Route("/api/snapshot", full, methods=["GET"]),
        Route("/api/stream", stream, methods=["GET"]),
        *(Route(f"/api/{name}", section(name), methods=["GET"]) for name in SECTIONS),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={KappaError: kappa_error}, lifespan=lifespan)


def check_port_free(host: str, port: int) -> None:
    """Fail with one clear line before uvicorn prints a traceback about a busy port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise KappaError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None


def check_options(host: str, port: int, interval: float) -> None:
    """The options and ``KAPPA_LATE_RERUN_SHARE``, one line each, before anything connects or binds."""
    if not host.strip():
        raise KappaError("--host must not be empty (127.0.0.1 serves this machine only, 0.0.0.0 every address)")
    if not 0 < port < 65536:
        raise KappaError(f"--port must be 1..65535, got {port}")
    if interval <= 0:
        raise KappaError(f"--interval must be > 0 seconds, got {interval}")
    late.rerun_share()


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8050, interval: float = 2.0) -> None:
    """Run the dashboard until Ctrl-C / SIGTERM."""
    check_options(host, port, interval)
    check_port_free(host, port)
    config = uvicorn.Config(
        create_app(settings, interval), host=host, port=port, log_level="warning", timeout_graceful_shutdown=2
    )
    uvicorn.Server(config).run()
