"""A local stand-in for the part of Kaggle's API that `KaggleApi.dataset_download_files` uses.

How the real client is pointed at it: with KAGGLE_API_ENVIRONMENT=LOCALHOST (read when `kaggle` is
first imported) the client calls http://localhost/api/v1/<Service>/<Method>, always port 80. To use
a free port instead, the stub also acts as a plain HTTP proxy: HTTP_PROXY names it, `requests`
sends it every request with the absolute URL, and the stub answers them itself.

Requests it understands (all POST with a JSON body, like the real API):
  security.OAuthService/IntrospectToken   {"token"} -> {"active", "username"}  (access-token login)
  datasets.DatasetApiService/DownloadDataset {"ownerSlug", "datasetSlug"} -> 302 to the zip
  datasets.DatasetApiService/GetDataset   {"ownerSlug", "datasetSlug"} -> {"currentVersionNumber"}
  competitions.CompetitionApiService/DownloadDataFiles {"competitionName"} -> 302 to the competition's zip
and GET /stub-storage/<owner>/<name>.zip (a competition's: /stub-storage/competitions/<name>.zip),
the redirect target (real Kaggle: a signed storage URL),
with an ETag and byte ranges as Google Cloud Storage serves it, optionally slowly (`throttle`).
"""

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

API = "/api/v1/"
STORAGE = "/stub-storage/"


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None
    body: dict
    range: str | None = None


class KaggleStub:
    """Serves `datasets` ({"owner/name": zip bytes}) and `competitions` ({"name": zip bytes}); use as a
    context manager."""

    def __init__(self, datasets: dict[str, bytes], *, competitions: dict[str, bytes] | None = None,
                 username="stub-user", key="stub-key-0123456789", token="KGAT_stub_token_0123456789", version=7,
                 leak_secrets_in_errors=False):
        self.datasets = datasets
        self.competitions = competitions or {}
        self.username, self.key, self.token, self.version = username, key, token, version
        self.leak_secrets_in_errors = leak_secrets_in_errors  # echo credentials in error bodies
        self.requests: list[Recorded] = []
        self.failures_served = 0
        self._fail_remaining, self._fail_status = 0, 503
        self.throttle = 0.0  # seconds per 64 KiB of a zip served: slow enough to kill a download midway
        self.last_modified = formatdate(usegmt=True)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def client_env(self) -> dict[str, str]:
        """Environment variables that send the real kaggle client here."""
        proxy = f"http://127.0.0.1:{self.port}"
        return {"KAGGLE_API_ENVIRONMENT": "LOCALHOST", "HTTP_PROXY": proxy, "http_proxy": proxy}

    def fail_next(self, count: int, status: int = 503):
        """Answer the next `count` requests (of any kind) with `status`."""
        with self._lock:
            self._fail_remaining, self._fail_status = count, status

    def api_calls(self, method_name: str) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith("/" + method_name)]

    # -- request handling (called from the server threads) --

    def _authorized(self, header: str | None) -> bool:
        basic = base64.b64encode(f"{self.username}:{self.key}".encode()).decode()
        return header in (f"Bearer {self.token}", f"Basic {basic}")

    def _error(self, status: int, message: str, header: str | None):
        if self.leak_secrets_in_errors:  # simulate a server/client that echoes what it was sent
            message += f" (Authorization: {header}; key={self.key}; token={self.token})"
        return status, {"Content-Type": "application/json"}, json.dumps({"code": status, "message": message}).encode()

    def handle(self, method: str, path: str, header: str | None, body: dict, byte_range: str | None = None):
        with self._lock:
            self.requests.append(Recorded(method, path, header, body, byte_range))
            if self._fail_remaining > 0:
                self._fail_remaining -= 1
                self.failures_served += 1
                return self._error(self._fail_status, "injected failure", header)

        if method == "GET" and path.startswith(STORAGE) and path.endswith(".zip"):
            stored = {**self.datasets, **{f"competitions/{name}": data for name, data in self.competitions.items()}}
            data = stored.get(path[len(STORAGE):-len(".zip")])
            if data is None:
                return 404, {"Content-Type": "text/plain"}, b"no such object"
            headers = {"Content-Type": "application/zip", "Last-Modified": self.last_modified,
                       "ETag": f'"{hashlib.sha256(data).hexdigest()[:16]}"', "Accept-Ranges": "bytes"}
            if byte_range and (match := re.fullmatch(r"bytes=(\d+)-", byte_range)):
                start = int(match.group(1))
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return 206, {**headers, "Content-Length": str(len(data) - start)}, data[start:]
            return 200, {**headers, "Content-Length": str(len(data))}, data
        if method != "POST" or not path.startswith(API):
            return 404, {"Content-Type": "text/plain"}, b"unknown endpoint"

        rpc = path[len(API):]
        if rpc == "security.OAuthService/IntrospectToken":
            active = body.get("token") == self.token
            return 200, {"Content-Type": "application/json"}, json.dumps(
                {"active": active, "username": self.username if active else ""}).encode()
        if rpc not in ("datasets.DatasetApiService/DownloadDataset", "datasets.DatasetApiService/GetDataset",
                       "competitions.CompetitionApiService/DownloadDataFiles"):
            return 404, {"Content-Type": "text/plain"}, b"unknown endpoint"
        if not self._authorized(header):
            return self._error(401, "Unauthenticated", header)
        if rpc.startswith("competitions."):
            name = body.get("competitionName")
            if name not in self.competitions:  # real Kaggle: also when the rules were not accepted
                return self._error(403, f"Competition {name} not found or rules not accepted", header)
            return 302, {"Location": f"http://localhost{STORAGE}competitions/{name}.zip", "Content-Length": "0"}, b""
        slug = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
        if slug not in self.datasets:
            return self._error(404, f"Dataset {slug} not found", header)
        if rpc.endswith("/GetDataset"):
            return 200, {"Content-Type": "application/json"}, json.dumps(
                {"ref": slug, "currentVersionNumber": self.version}).encode()
        return 302, {"Location": f"http://localhost{STORAGE}{slug}.zip", "Content-Length": "0"}, b""


def _handler_for(stub: KaggleStub):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {}
            # As a proxy we receive absolute URLs ("http://localhost/api/..."); keep the path.
            path = urlsplit(self.path).path
            status, headers, payload = stub.handle(self.command, path, self.headers.get("Authorization"), body,
                                                   self.headers.get("Range"))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            chunk = 1 << 16 if stub.throttle and headers.get("Content-Type") == "application/zip" else len(payload) or 1
            for start in range(0, len(payload), chunk):
                self.wfile.write(payload[start:start + chunk])
                time.sleep(stub.throttle)

        do_GET = do_POST = _serve

        def log_message(self, *args):  # keep test output quiet
            pass

    return Handler
