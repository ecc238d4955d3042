"""A small server speaking Ollama's HTTP/NDJSON wire protocol, for driving the official client.

Endpoints: GET /api/version, GET /api/tags, POST /api/pull (streamed progress), POST /api/chat
(streamed NDJSON or one JSON object; honours ``format`` and records ``options``), and the
OpenAI-compatible GET /v1/models and POST /v1/chat/completions that Ollama also serves.
Replies come from a deterministic grader; ``faults`` scripts failures and odd replies.

On its own, to try the judge path without Ollama (Ctrl-C or SIGTERM stops it)::

    python -m tests.ollama_server --port 11434 [--model llama3]
    sft-job run --smoke --judge-url http://127.0.0.1:11434
"""

from __future__ import annotations

import collections
import json
import re
import socket
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROMPT_RE = re.compile(r"and correct output `(.*)`, score the model response `(.*)` on a scale from 0 to 100", re.S)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def overlap_grade(output: str, response: str) -> int:
    """The test's judge: the share of the correct output's words that the response contains."""
    expected = words(output)
    return round(100 * len(expected & words(response)) / len(expected)) if expected else 0


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that hung up on a reply it refused (too large, too slow) is expected here."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeOllama:
    def __init__(self, port: int = 0, models: tuple[str, ...] = ("llama3:latest",)):
        self.models = list(models)
        self.chats: list[dict] = []  # every /api/chat (or /v1/chat/completions) body received
        self.chat_headers: list[dict[str, str]] = []  # and the headers each came with (names lower-cased)
        self.pulls: list[dict] = []
        self.faults: collections.deque = collections.deque()  # "500", "404", or ("reply", text)
        # How every chat request is answered while set: "ok", "500" (always), "hang" (no answer until
        # ``release`` is set or 30 s pass), "drop" (the connection closed unanswered), "garbage" (a 200
        # whose body is not JSON), "huge" (a 200 whose reply is ``huge_bytes`` long), "trickle" (a
        # correct reply sent one byte every ``trickle_s``), "shape" (``shape``: a status and the raw body
        # sent as it is, for replies of any shape).
        self.mode = "ok"
        self.shape: tuple[int, str] = (200, "{}")
        # A path's every answer replaced by (status, raw body), e.g. "/api/tags", "/v1/models", "/api/pull"
        # (NDJSON: one JSON value a line): what a server of another version, or a broken proxy, may send.
        self.bodies: dict[str, tuple[int, str]] = {}
        self.huge_bytes = 2 << 20
        self.trickle_s = 0.25
        self.chat_times: list[float] = []  # time.monotonic() of every chat request
        self.trickled: list[int] = []  # bytes of each trickled reply sent before the client hung up
        self.healthy_for = 0  # chat requests answered normally before ``mode`` applies
        # OpenAI response_format types answered with llama-cpp-python's HTTP 500 for a field it does not take.
        self.refused_formats: set[str] = set()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.chat_arrived = threading.Condition(self.lock)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, status: int, body, retry_after: str | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _raw(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _ndjson(self, lines: list[dict]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for line in lines:
                    data = (json.dumps(line) + "\n").encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")

            def _body(self) -> dict:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def do_GET(self):
                if self.path in server.bodies:
                    self._raw(*server.bodies[self.path])
                elif self.path == "/api/version":
                    self._json(200, {"version": "0.12.0"})
                elif self.path == "/api/tags":
                    self._json(200, {"models": [server._tag(m) for m in server.models]})
                elif self.path == "/v1/models":
                    self._json(
                        200,
                        {
                            "object": "list",
                            "data": [
                                {"id": m, "object": "model", "created": 0, "owned_by": "library"} for m in server.models
                            ],
                        },
                    )
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self):
                body = self._body()
                if self.path in ("/api/chat", "/v1/chat/completions"):
                    with server.lock:
                        server.chat_headers.append({k.lower(): v for k, v in self.headers.items()})
                if self.path == "/api/pull":
                    server._pull(self, body)
                elif self.path == "/api/chat":
                    server._chat(self, body)
                elif self.path == "/v1/chat/completions":
                    server._openai_chat(self, body)
                else:
                    self._json(404, {"error": "not found"})

        self.httpd = QuietServer(("127.0.0.1", port), Handler, bind_and_activate=False)
        self.httpd.allow_reuse_address = True
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeOllama:
        self.httpd.server_bind()
        self.httpd.server_activate()
        self.port = self.httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()

    # --- behaviour -------------------------------------------------------------------------

    @staticmethod
    def _tag(name: str) -> dict:
        return {
            "name": name,
            "model": name,
            "modified_at": datetime.now(UTC).isoformat(),
            "size": 4661224676,
            "digest": "365c0bd3c000a25d28ddbf732fe1c6add414de7275464c4e4d1c3b5fcb5d8ad1",
            "details": {"format": "gguf", "family": "llama", "parameter_size": "8.0B", "quantization_level": "Q4_0"},
        }

    def _next_fault(self):
        with self.lock:
            return self.faults.popleft() if self.faults else None

    def _grade(self, body: dict) -> tuple[str | None, int]:
        """(content, http status): the grader's reply, or a scripted fault."""
        fault = self._next_fault()
        if fault in ("500", "503"):
            return None, int(fault)
        if isinstance(fault, tuple) and fault[0] in ("429", "503"):  # (status, Retry-After value)
            return fault[1], int(fault[0])
        if fault == "404":
            return None, 404
        prompt = body["messages"][-1]["content"]
        match = PROMPT_RE.search(prompt)
        score = overlap_grade(match.group(1), match.group(2)) if match else 0
        if isinstance(fault, tuple) and fault[0] == "reply":
            return fault[1], 200
        structured = body.get("format") not in (None, "") or "response_format" in body
        return (json.dumps({"score": score}) if structured else str(score)), 200

    def wait_for_chats(self, count: int, timeout: float = 60) -> bool:
        """Block until ``count`` chat requests have arrived (or the timeout passes)."""
        with self.chat_arrived:
            return self.chat_arrived.wait_for(lambda: len(self.chats) >= count, timeout)

    def _misbehave(self, handler) -> bool:
        """Answer as ``mode`` says; False when the request is to be answered normally."""
        if self.mode == "ok" or len(self.chats) <= self.healthy_for:
            return False
        if self.mode == "500":
            handler._json(500, {"error": "internal server error"})
        elif self.mode == "hang":
            self.release.wait(30)
            handler.close_connection = True
        elif self.mode == "drop":
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
        elif self.mode == "huge":
            handler._json(200, {"message": {"role": "assistant", "content": "9" * self.huge_bytes}, "done": True})
        elif self.mode == "shape":
            handler._raw(*self.shape)
        elif self.mode == "trickle":
            self._trickle(handler, json.dumps({"message": {"role": "assistant", "content": "50"}, "done": True}))
        elif self.mode == "garbage":
            data = b"<html><body>502 Bad Gateway</body></html>"
            handler.send_response(200)
            handler.send_header("Content-Type", "text/html")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        return True

    def _trickle(self, handler, text: str) -> None:
        data = text.encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.flush()
        sent = 0
        try:
            while sent < len(data) and not self.release.wait(self.trickle_s):
                handler.wfile.write(data[sent : sent + 1])
                handler.wfile.flush()
                sent += 1
        except OSError:  # the client gave up and closed the connection
            pass
        with self.lock:
            self.trickled.append(sent)
        handler.close_connection = True

    def _chat(self, handler, body: dict) -> None:
        with self.chat_arrived:
            self.chat_times.append(time.monotonic())
            self.chats.append(body)
            self.chat_arrived.notify_all()
        if self._misbehave(handler):
            return
        if body["model"] not in self.models and f"{body['model']}:latest" not in self.models:
            handler._json(404, {"error": f"model '{body['model']}' not found"})
            return
        content, status = self._grade(body)
        if status != 200:
            handler._json(status, {"error": f"scripted {status}"}, retry_after=content)
            return
        now = datetime.now(UTC).isoformat()
        final = {
            "model": body["model"],
            "created_at": now,
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "total_duration": 1000,
            "eval_count": 1,
        }
        if body.get("stream", True):
            pieces = [content[i : i + 3] for i in range(0, len(content), 3)]
            handler._ndjson(
                [
                    {
                        "model": body["model"],
                        "created_at": now,
                        "message": {"role": "assistant", "content": p},
                        "done": False,
                    }
                    for p in pieces
                ]
                + [final]
            )
        else:
            final["message"]["content"] = content
            handler._json(200, final)

    def _openai_chat(self, handler, body: dict) -> None:
        with self.lock:
            self.chats.append(body)
        if self._misbehave(handler):
            return
        refused = (body.get("response_format") or {}).get("type")
        if refused in self.refused_formats:
            message = f"1 validation error: response_format.type: Input should be 'text', got {refused!r}"
            handler._json(500, {"error": {"message": message, "type": "internal_server_error"}})
            return
        content, status = self._grade(body)
        if status != 200:
            error = {"error": {"message": f"scripted {status}", "type": "api_error"}}
            handler._json(status, error, retry_after=content)
            return
        handler._json(
            200,
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    def _pull(self, handler, body: dict) -> None:
        self.pulls.append(body)
        if "/api/pull" in self.bodies:
            handler._raw(*self.bodies["/api/pull"])
            return
        name = body["model"] if ":" in body["model"] else f"{body['model']}:latest"
        digest = "sha256:" + "ab" * 32
        lines = [{"status": "pulling manifest"}]
        lines += [
            {"status": f"pulling {digest[7:19]}", "digest": digest, "total": 1000, "completed": c}
            for c in (0, 500, 1000)
        ]
        lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
        with self.lock:
            self.models.append(name)
        handler._ndjson(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m tests.ollama_server", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=11434, help="port on 127.0.0.1 (default 11434, Ollama's)")
    parser.add_argument("--model", action="append", help="a model it already has (default llama3; repeatable)")
    args = parser.parse_args(argv)
    models = tuple(m if ":" in m else f"{m}:latest" for m in (args.model or ["llama3"]))
    server = FakeOllama(args.port, models=models).start()
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    print(f"Ollama stand-in listening on {server.url} with {', '.join(models)}", flush=True)
    stopped.wait()
    server.stop()


if __name__ == "__main__":
    main()
