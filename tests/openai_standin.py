"""A local stand-in for an OpenAI-compatible chat-completions server (127.0.0.1 only).

Answers are a pure function of (seed, messages, sampling settings), like a seeded vLLM server, so
tests can compare runs. Behaviours for tests: per-request delay, HTTP errors for chosen prompts,
transient failures, and a 'down' switch that drops connections.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def send_json(h: BaseHTTPRequestHandler, code: int, obj: dict) -> None:
    """Reply to the request ``h`` is handling with ``obj`` as JSON (shared by the test HTTP stand-ins)."""
    data = json.dumps(obj).encode()
    h.send_response(code)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


class StandIn:
    def __init__(
        self,
        delay: float = 0.0,
        reject_if: str = "BAD",
        transient: dict | None = None,
        down_after: int | None = None,
    ):
        self.delay = delay
        self.reject_if = reject_if
        self.transient = dict(transient or {})  # prompt substring -> number of 503s before success
        self.down_after = down_after  # drop connections after this many answered requests
        self.down = False
        self.requests: list = []
        self.answered = 0
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                outer._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def answer(body: dict) -> str:
        key = json.dumps(
            [
                body.get("seed"),
                body["messages"],
                body.get("temperature"),
                body.get("top_p"),
                body.get("top_k"),
            ],
            sort_keys=True,
        )
        h = hashlib.sha256(key.encode()).hexdigest()[:12]
        return f"answer {h} to: {body['messages'][-1]['content'][:24]}"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        with self._lock:
            if self.down or (self.down_after is not None and self.answered >= self.down_after):
                self.down = True
                h.close_connection = True
                return  # no response: the client sees the connection drop
            self.requests.append(body)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            prompt = body["messages"][-1]["content"]
            fail = next((k for k, n in self.transient.items() if k in prompt and n > 0), None)
            if fail is not None:
                self.transient[fail] -= 1
        try:
            if self.delay:
                time.sleep(self.delay)
            if h.path != "/v1/chat/completions":
                return send_json(h, 404, {"error": "not found"})
            if fail is not None:
                return send_json(h, 503, {"error": "busy"})
            if self.reject_if and self.reject_if in prompt:
                return send_json(h, 400, {"error": "prompt rejected"})
            with self._lock:
                self.answered += 1
            send_json(
                h,
                200,
                {
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": self.answer(body)},
                        }
                    ]
                },
            )
        finally:
            with self._lock:
                self._in_flight -= 1

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
