"""A small HTTP proxy in front of the moto S3 server that records every request and answers chosen ones
with an S3 error instead of forwarding them (503 SlowDown, 403 InvalidAccessKeyId...), as a real object
store does under load or with wrong credentials."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__all__ = ["S3Proxy", "Request"]

_ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
               '<RequestId>proxy</RequestId></Error>')


@dataclass(frozen=True)
class Request:
    """One request the proxy saw: ``method``, ``path`` (``/bucket/key?query``), the access key id it was
    signed with, and the status it got."""

    method: str
    path: str
    access_key: str
    status: int = 0
    copy: bool = False  # a server-side copy (PUT with x-amz-copy-source)


@dataclass
class S3Proxy:
    """Forwards to ``upstream`` (``http://host:port``); ``rule(request) -> (status, code) | None`` answers a
    request with that error instead. ``requests`` lists what was seen, in order."""

    upstream: str
    rule: Callable[[Request], tuple[int, str] | None] = lambda request: None
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        proxy = self
        target = urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        chunk = self.rfile.read(size)
                        self.rfile.readline()
                        if size == 0:
                            return b"".join(chunks)
                        chunks.append(chunk)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                auth = self.headers.get("Authorization", "")
                key = auth.split("Credential=")[1].split("/")[0] if "Credential=" in auth else ""
                copy = "x-amz-copy-source" in {k.lower() for k in self.headers}
                request = Request(self.command, self.path, key, copy=copy)
                verdict = proxy.rule(request)
                if verdict is not None:
                    status, code = verdict
                    data = _ERROR_BODY.format(code=code, message=f"injected by the test proxy ({code})").encode()
                    proxy.requests.append(Request(self.command, self.path, key, status, copy))
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                proxy.requests.append(Request(self.command, self.path, key, response.status, copy))
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "date", "server"):
                        self.send_header(k, v)
                # a HEAD's Content-Length is the object's size, not this (empty) body's
                self.send_header("Content-Length", response.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def creates_bucket(self) -> list[Request]:
        """Requests that would create a bucket: a PUT on a bucket's root (``/bucket`` or ``/bucket/``)."""
        return [r for r in self.requests if r.method == "PUT" and urlsplit(r.path).path.strip("/").count("/") == 0]
