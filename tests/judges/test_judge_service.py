"""The OpenAI judge against a faulty completions service on 127.0.0.1.

Each fault comes after a first batch was answered, and ends in a retry that
succeeds or in one line (JudgeUnavailableError); the verdicts obtained so far
are in the verdict cache and a rerun asks only for the others. What
tests/test_judges.py covers already is not repeated here: the happy path, a
refused port, a missing key, retries of 429 / 500 / timeouts that succeed at
once, giving up after the retries of a 500, and a 401 on the first request.
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from slim.judges import JudgeUnavailableError, OpenAIJudge

KEY = "sk-test-dummy-7311"
MODEL = "judge-model"
QS = ["What is the capital of France?", "Who wrote Hamlet?", "What happens if you eat seeds?", "Where is London?"]
AS = ["Paris.", "Marlowe.", "Nothing happens.", "In France."]


def p_yes(prompt: str) -> float:
    return 0.9 if "Paris" in prompt or "Nothing" in prompt else 0.2


EXPECTED = np.array([0.9, 0.2, 0.9, 0.2])


class Service:
    """POST /v1/completions; `plan` holds the next replies: ok, 429 (Retry-After: 1), 500, hang, malformed,
    nologprobs, 401; once it is empty every reply is ok. `prompts` records what each request asked."""

    def __init__(self):
        self.plan: list[str] = []
        self.prompts: list[list[str]] = []
        self.release = threading.Event()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                service.prompts.append(body["prompt"])
                action = service.plan.pop(0) if service.plan else "ok"
                try:
                    if action == "hang":
                        service.release.wait(5)
                    elif action == "malformed":
                        self._send(200, b'{"id": "cmpl-1", "choices": [{"index": 0, "logpro')
                    elif action in ("429", "500", "401"):
                        error = {"error": {"message": f"failure {action}", "type": "error", "code": action}}
                        self._send(int(action), json.dumps(error).encode(), retry_after=action == "429")
                    else:
                        choices = [
                            {
                                "index": i,
                                "text": " yes",
                                "finish_reason": "length",
                                "logprobs": None
                                if action == "nologprobs"
                                else {"top_logprobs": [{" yes": math.log(p_yes(p)), " no": math.log(0.05)}]},
                            }
                            for i, p in enumerate(body["prompt"])
                        ]
                        reply = {
                            "id": "c",
                            "object": "text_completion",
                            "created": 0,
                            "model": MODEL,
                            "choices": choices,
                        }
                        self._send(200, json.dumps(reply).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, status, data, retry_after=False):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if retry_after:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def service(monkeypatch):
    s = Service()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", s.url)
    yield s
    s.close()


def judge(tmp_path, **kw):
    opts = dict(timeout=0.5, backoff_base=0.01, max_retries=2, batch_size=2)
    opts.update(kw)
    return OpenAIJudge(MODEL, "truth", cache_path=tmp_path / "verdicts.json", **opts)


def cached(tmp_path) -> dict:
    return json.loads((tmp_path / "verdicts.json").read_text())["verdicts"]


def retries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "slim.judges" and "retry" in r.getMessage()]


def test_rate_limit_waits_as_long_as_retry_after_says(service, tmp_path, caplog):
    service.plan = ["ok", "429"]
    t0 = time.monotonic()
    np.testing.assert_allclose(judge(tmp_path).score(QS, AS), EXPECTED)
    assert time.monotonic() - t0 >= 0.95  # the server's Retry-After: 1, not the 0.01 s backoff
    (line,) = retries(caplog)
    assert "RateLimitError 429" in line and "in 1.00s" in line and KEY not in line
    assert len(service.prompts) == 3 and service.prompts[1] == service.prompts[2]


def test_server_error_then_success_mid_run(service, tmp_path, caplog):
    service.plan = ["ok", "500"]
    j = judge(tmp_path)
    np.testing.assert_allclose(j.score(QS, AS), EXPECTED)
    assert j.n_requests == 3 and len(retries(caplog)) == 1 and len(cached(tmp_path)) == 4


@pytest.mark.parametrize(
    "fault, says",
    [
        ("hang", "APITimeoutError: Request timed out. after 3 attempts"),
        ("malformed", "the reply is not valid JSON"),
        ("500", "InternalServerError 500: Error code: 500 - failure 500 after 3 attempts"),
    ],
)
def test_persistent_fault_is_one_line_and_the_rerun_asks_only_the_rest(service, tmp_path, fault, says):
    service.plan = ["ok"] + [fault] * 3
    with pytest.raises(JudgeUnavailableError) as info:
        judge(tmp_path, timeout=0.3).score(QS, AS)
    message = str(info.value)
    assert "\n" not in message and says in message and KEY not in message
    assert "2 verdicts are saved in" in message and "rerun (cached verdicts are reused)" in message
    assert len(service.prompts) == 1 + 3 and len(cached(tmp_path)) == 2

    # The service recovers: the rerun asks for the two missing verdicts only.
    np.testing.assert_allclose(judge(tmp_path).score(QS, AS), EXPECTED)
    assert len(service.prompts) == 5 and service.prompts[-1] == [p for p in service.prompts[1]]
    assert not set(service.prompts[0]) & set(service.prompts[-1])


def test_malformed_reply_is_retried(service, tmp_path, caplog):
    service.plan = ["malformed"]
    np.testing.assert_allclose(judge(tmp_path).score(QS, AS), EXPECTED)
    (line,) = retries(caplog)
    assert "the reply is not valid JSON" in line and len(service.prompts) == 3


@pytest.mark.parametrize(
    "fault, says",
    [
        ("nologprobs", "the reply has 2 choices for 2 prompts or lacks logprobs"),
        ("401", "the API key was rejected (AuthenticationError 401: Error code: 401 - failure 401)"),
    ],
)
def test_fault_that_retrying_cannot_mend_stops_at_once_keeping_verdicts(service, tmp_path, fault, says):
    service.plan = ["ok", fault]
    with pytest.raises(JudgeUnavailableError) as info:
        judge(tmp_path).score(QS, AS)
    message = str(info.value)
    assert "\n" not in message and says in message and KEY not in message and "2 verdicts are saved" in message
    assert len(service.prompts) == 2 and len(cached(tmp_path)) == 2  # no retry

    np.testing.assert_allclose(judge(tmp_path).score(QS, AS), EXPECTED)
    assert len(service.prompts) == 3 and service.prompts[2] == service.prompts[1]
