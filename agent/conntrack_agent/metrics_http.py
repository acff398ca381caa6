"""The optional /metrics endpoint (`[metrics] listen`): the only module importing http.server.

Imported only when a listen address is set: http.server costs ~2.7 MB of RSS,
over a tenth of the agent's idle budget. It serves the text the agent rendered
at its last status update (once a second), from a daemon thread: a scrape
never runs agent code and never waits for a tick, and a slow scraper cannot
delay one beyond the GIL's switch interval.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_listen(listen: str) -> Tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class MetricsServer:
    def __init__(self, listen: str, text: Callable[[], str]):
        host, port = parse_listen(listen)
        current = text

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = current().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass  # scrapes are not decisions: they stay out of the journal

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.server = Server((host, port), Handler)
        self.address = self.server.server_address
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
