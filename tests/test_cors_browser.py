"""CORS: the gateway answers preflights itself and labels every answer; a real browser streams through it.

The browser test runs Debian's headless Chromium (`.ci/run` installs it when missing) on a page served
from another origin, and reads the page it rendered.
"""

from __future__ import annotations

import html
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CHAT, Gateway, Stack

KEY = "sk-browser-0123456789"
PAGE = """<!doctype html>
<html><body><pre id="out">waiting</pre><script>
(async () => {
  const out = document.getElementById("out");
  try {
    const response = await fetch("GATEWAY/v1/chat/completions", {
      method: "POST",
      headers: {"Authorization": "Bearer KEY", "Content-Type": "application/json", "X-Session-Id": "tab-1"},
      body: JSON.stringify({model: "mock", stream: true, max_tokens: 8,
                            messages: [{role: "user", content: "Hello from a browser"}]}),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let text = "", buffer = "", events = 0;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const delta = JSON.parse(event.slice(6)).choices[0]?.delta?.content;
        if (delta) { text += delta; events++; }
      }
    }
    out.textContent = `status=${response.status} events=${events} request=${response.headers.get("x-request-id")} text=${text}`;
  } catch (error) {
    out.textContent = "failed: " + error;
  }
})();
</script></body></html>
"""


class _Page(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def page_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def page_origin(server: http.server.ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


APP = "http://app.example"


@pytest.fixture(scope="module")
def gateway(page_server: http.server.ThreadingHTTPServer) -> Iterator[Gateway]:
    """One key, CORS for two origins (a made-up app and the test page), no admin port."""
    stack = Stack("cors")
    try:
        replica = stack.replica("r1")
        yield stack.gateway([stack.router([replica])], [replica], "--api-key", KEY,
                            "--cors-origins", f"{APP},{page_origin(page_server)}")
    finally:
        stack.stop()


def test_preflight_and_every_answer_carry_cors_headers(gateway: Gateway) -> None:
    origin = APP
    url = f"{gateway.url}/v1/chat/completions"
    preflight = httpx.options(url, headers={"origin": origin, "access-control-request-method": "POST",
                                            "access-control-request-headers": "authorization, content-type"})
    assert preflight.status_code == 200 and preflight.content == b""
    assert preflight.headers["access-control-allow-origin"] == origin
    allowed = preflight.headers["access-control-allow-headers"]
    assert "authorization" in allowed and "x-session-id" in allowed
    # An error (no key) and a stream both carry exactly one Allow-Origin: the replica's own CORS stays silent.
    refused = httpx.post(url, json=CHAT, headers={"origin": origin})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin
    with httpx.stream("POST", url, json={**CHAT, "stream": True},
                      headers={"origin": origin, "authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        assert response.headers.get_list("access-control-allow-origin") == [origin]
        assert "x-serve-reason" in response.headers["access-control-expose-headers"]
        assert b"[DONE]" in response.read()
    other = httpx.options(url, headers={"origin": "http://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in other.headers


def test_without_an_admin_port_routes_and_metrics_need_a_key(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/-/healthz").status_code == 200
    for path in ("/-/routes", "/-/metrics"):
        assert httpx.get(f"{gateway.url}{path}").status_code == 401
        assert httpx.get(f"{gateway.url}{path}", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_a_caller_without_a_key_gets_401_and_the_connection_stays_usable(gateway: Gateway) -> None:
    big = {**CHAT, "padding": "x" * (2 * 1024 * 1024)}  # dropped as it arrives, never buffered or forwarded
    with httpx.Client() as client:
        refused = client.post(f"{gateway.url}/v1/chat/completions", json=big)
        assert refused.status_code == 401 and refused.headers["x-serve-reason"] == "unauthorized"
        ok = client.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["choices"]


def test_a_browser_page_from_another_origin_streams_a_chat_completion(
        gateway: Gateway, page_server: http.server.ThreadingHTTPServer, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (`apt-get install -y chromium`; .ci/run installs it)")
    _Page.body = PAGE.replace("GATEWAY", gateway.url).replace("KEY", KEY).encode()
    # --virtual-time-budget holds the DOM dump until the page's fetches and timers have run their course.
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-extensions", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path}",
         "--virtual-time-budget=15000", "--dump-dom", page_origin(page_server) + "/"],
        capture_output=True, text=True, timeout=60).stdout
    shown = html.unescape(dom.split('<pre id="out">', 1)[1].split("</pre>", 1)[0]) if '<pre id="out">' in dom else dom
    assert shown.startswith("status=200 events=8"), shown
    assert "text=" in shown and shown.split("text=", 1)[1].strip()
    # The gateway saw the preflight and the request, and logged the key's name, never the key.
    log = gateway.log()
    assert '"method":"OPTIONS"' in log and '"key":"default"' in log and KEY not in log
