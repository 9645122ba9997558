"""Small HTTP servers on loopback for the tests: data sources, receivers, fake providers."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer(ThreadingHTTPServer):
    """A thread per connection, and a listen backlog as deep as a real receiver's (socketserver's is 5).

    With the default, a burst of deliveries from several server processes overflowed the
    backlog, and connections waited for the kernel to retry them past the webhook timeout.
    """

    request_queue_size = 512


def serve_on_loopback(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """Serve `handler` on a free 127.0.0.1 port in the background; returns the server and its base URL."""
    httpd = LoopbackServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
