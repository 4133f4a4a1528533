"""A real uvicorn server on loopback in a background thread, for tests and the demo.

Tests that are about HTTP use this (not only TestClient): real sockets, real timeouts, real
connection errors when it is stopped. ``stop()`` then ``start()`` brings it back on the SAME port,
which is how fault tests take the service away in the middle of an RL run.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from rm_service.settings import ServiceSettings


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, settings: ServiceSettings, app=None, shutdown_timeout_s: float = 5.0):
        """``app``: serve this ASGI app instead of the service built from ``settings`` (test doubles,
        recorders); ``shutdown_timeout_s``: how long stop() lets in-flight requests finish."""
        if not settings.is_loopback:
            raise ValueError("ServerThread binds loopback addresses only")
        if settings.port == 0:
            settings = settings.model_copy(update={"port": free_port(settings.host)})
        self.settings = settings
        self._app = app
        self.shutdown_timeout_s = shutdown_timeout_s
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def start(self, timeout_s: float = 180.0) -> ServerThread:
        app = self._app
        if app is None:
            from rm_service.app import create_app

            app = create_app(self.settings)
        config = uvicorn.Config(app, host=self.settings.host, port=self.settings.port, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=self.shutdown_timeout_s)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="salmon-test-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the test server exited during start (see its log above)")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server at {self.url} not ready after {timeout_s} s")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._server, self._thread = None, None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
