"""The page's script shows an answer's tool calls, streamed and final, besides its text.

Runs ``static/nexus.js`` in Node with a few stand-ins for the browser (no network, no
socket). Node is a prerequisite of the test suite, as the JDK is: without it this fails, naming it,
rather than skipping. The browser test is in
tests/integration/test_bridge.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "producers" / "gateway" / "static" / "nexus.js"

HARNESS = r"""
const fs = require("fs");
const els = {};
function el(id) {
  if (!els[id]) els[id] = {
    id, textContent: "", dataset: {}, hidden: false, children: [], disabled: false, value: "", rows: [],
    addEventListener() {}, appendChild(c) { this.children.push(c); }, replaceChildren(...c) { this.children = c; },
    insertBefore(c) { this.children.unshift(c); }, deleteRow() {},
  };
  return els[id];
}
function node(tag) {
  return { tag, textContent: "", dataset: {}, parts: [], kids: [],
           append(...p) { this.parts.push(...p); }, appendChild(c) { this.kids.push(c); } };
}
global.window = {};
global.document = { getElementById: el, createElement: node };
global.sessionStorage = { getItem: () => null, setItem() {} };
global.location = { hash: "", search: "", pathname: "/", protocol: "http:", hostname: "localhost" };
global.history = { replaceState() {} };
global.performance = { now: () => 1000 };
global.fetch = () => new Promise(() => {});  // the page never gets its config: no socket is opened
global.WebSocket = { OPEN: 1 };
eval(fs.readFileSync(process.argv[2], "utf8") + "\nglobal.exposed = { onFrame, page };");
const { onFrame, page } = global.exposed;
el("tool-calls").hidden = true;  // as index.html has it
const shown = () => ({
  hidden: el("tool-calls").hidden,
  items: el("tool-calls").children.map((li) => li.parts.map((p) => (typeof p === "string" ? p : p.textContent)).join("")),
});
page.ws = { readyState: 1 };
page.current = { id: "r1", t0: 0, nextSeq: 0, chunks: 0, text: "", toolCalls: [], firstTokenAt: null, done: false };
const call = { id: null, name: "get_weather", arguments: { city: "Paris" } };
const out = {};
onFrame({ type: "token", id: "r1", seq: 0, text: "Let me look." });
out.text_only = shown();
onFrame({ type: "token", id: "r1", seq: 1, text: "", tool_calls: [call] });
out.streamed = shown();
onFrame({ type: "result", id: "r1", status: "ok", output: "Let me look.", tool_calls: [call],
          message: { role: "assistant", content: "Let me look.", tool_calls: [call] },
          context: { session_id: "s" }, completed_at: "2024-05-01T00:00:00Z", model_id: "m", latency_ms: 5,
          prompt_tokens: 1, completion_tokens: 2 });
out.result = shown();
out.answer = els["answer"].textContent;
out.recent = els["recent"].children[0].kids[6].textContent;
out.last_run = page.lastRun;
console.log(JSON.stringify(out));
"""


def test_the_page_shows_streamed_and_final_tool_calls(tmp_path: Path) -> None:
    if shutil.which("node") is None:
        pytest.fail("Node.js is not installed: this test runs the page's script in it", pytrace=False)
    harness = tmp_path / "harness.js"
    harness.write_text(HARNESS)
    done = subprocess.run(["node", str(harness), str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["text_only"] == {"hidden": True, "items": []}
    assert out["streamed"] == {"hidden": False, "items": ['tool call get_weather({"city":"Paris"})']}
    assert out["result"] == out["streamed"]
    assert out["answer"] == "Let me look."
    assert out["recent"] == 'Let me look. [tool call] get_weather({"city":"Paris"})'
    call = {"id": None, "name": "get_weather", "arguments": {"city": "Paris"}}
    assert out["last_run"]["tool_calls"] == out["last_run"]["streamed_tool_calls"] == [call]
