"""The console as a person uses it, in a real headless Chromium (Selenium),
against a real `portcullis serve`, a real demo MCP server over Streamable
HTTP, and a real MCP client (the `mcp` Python SDK) whose call waits for a
person's approval. Driven by `tests/console_browser.rs`:

    python3 console_browser.py PORTCULLIS_BINARY WORK_DIR [SCREENSHOT_DIR]

With SCREENSHOT_DIR, a PNG of each page is saved there (what
`scripts/console-screenshots.sh` does). Prints `ok` and exits 0 when every
step went as a person would expect; any failed expectation raises.

The steps:
1. sign in with an admin token;
2. an agent's MCP client calls a high-risk tool; the call is held: the
   person sees it arrive in the approvals inbox (tool, agent, goal,
   arguments), approves it with a note, and the waiting client gets the
   tool's result;
3. the person halts a task from its page and watches the live stream show
   the halt;
4. the upstream changes a tool's definition; the person sees the diff on
   the pins page and approves it, and the tool works again.
"""

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ADMIN = "browser-test-admin-token"
BOOTSTRAP = "browser-test-bootstrap-secret"
GOAL = "load the new customers into staging"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(s):
    return hashlib.sha256(s.encode()).hexdigest()


def wait_http(url, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


def api(base, method, path, token, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


CONFIG = """
[server]
listen = "127.0.0.1:{port}"
issuer = "http://127.0.0.1:{port}"

[store]
url = "sqlite://ledger.db"

[tokens]
signing_key = "keys/k.ed25519"

[[admins]]
name = "ops"
roles = ["admin", "approver", "auditor"]
token_sha256 = "{admin}"

# The demo warehouse over stdio; once the file `drift` exists, a restart
# of the child advertises a changed definition of `query`.
[[upstreams]]
name = "warehouse"
transport = "stdio"
command = ["/bin/sh", "-c", "if [ -e '{work}/drift' ]; then exec '{bin}' demo-server warehouse --drift; else exec '{bin}' demo-server warehouse; fi"]
credential = {{ kind = "none" }}

[[tools]]
name = "warehouse.query"
upstream = "warehouse"
risk = "low"
access = "read"

[[tools]]
name = "warehouse.insert"
upstream = "warehouse"
risk = "high"
access = "write"

[[agent_types]]
name = "loader"
initial = "explore"
auto_advance = true
states = [
  {{ name = "explore", tools = ["warehouse.query"], next = ["work"] }},
  {{ name = "work", tools = ["warehouse.query", "warehouse.insert"], next = ["publish", "done"] }},
  {{ name = "publish", tools = ["warehouse.insert"], next = ["done"], reverify = true, approval = true }},
  {{ name = "done", final = true }},
]

[[agents]]
id = "loader-bot"
type = "loader"
tools = ["warehouse.query", "warehouse.insert"]
bootstrap_sha256 = "{bootstrap}"
approve_high_risk = true

[approval]
hold = "90s"
"""


class Rig:
    """The gateway, its upstream, and what they log."""

    def __init__(self, binary, work):
        self.binary, self.work = binary, work
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs = []
        os.makedirs(os.path.join(work, "keys"), exist_ok=True)
        with open(os.path.join(work, "portcullis.toml"), "w") as f:
            f.write(CONFIG.format(port=self.port, work=work, bin=binary, admin=sha(ADMIN), bootstrap=sha(BOOTSTRAP)))
        subprocess.run([binary, "keygen", "--out", os.path.join(work, "keys/k.ed25519")],
                       check=True, capture_output=True)
        self.gateway = self.spawn([binary, "serve", "--config", os.path.join(work, "portcullis.toml")], "gateway.log")
        wait_http(self.base + "/readyz")

    def spawn(self, argv, log):
        out = open(os.path.join(self.work, log), "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.work)
        self.procs.append(p)
        return p

    def drift_upstream(self):
        """The upstream comes back with a changed tool definition: the flag
        file, then the gateway's stdio child (found by its parent's pid) is
        stopped; the gateway reconnects and lists the tools again."""
        open(os.path.join(self.work, "drift"), "w").close()
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.gateway.pid)],
                                  capture_output=True, text=True).stdout.split()
        assert children, "the gateway has no upstream child"
        for pid in children:
            os.kill(int(pid), 15)

    def stop(self, p):
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                self.stop(p)

    def start_task(self):
        status, body = api(self.base, "POST", "/v1/tasks", BOOTSTRAP, {"agent_id": "loader-bot", "goal": GOAL})
        assert status == 201, body
        return body


def mcp_call(url, token, name, arguments, out):
    """A real MCP client (legacy era: 2025-11-25 sessions) making one call;
    puts its result (or error) in `out`."""
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client
    import httpx2

    out["progress"] = []

    async def progress(value, total, message):
        out["progress"].append({"progress": value, "total": total, "message": message})

    async def run():
        timeout = httpx2.Timeout(120.0)
        async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as http:
            async with Client(streamable_http_client(url, http_client=http), mode="legacy", cache=None) as client:
                # The call waits for a person; with a progress callback the
                # client hears of the wait while it lasts.
                result = await client.call_tool(name, arguments, read_timeout_seconds=120,
                                                progress_callback=progress)
                return result.model_dump(mode="json", by_alias=True, exclude_none=True)

    try:
        out["result"] = asyncio.run(run())
    except BaseException as e:  # reported by the main thread
        out["error"] = repr(e)


class Person:
    """A person at a browser."""

    def __init__(self, base, shots):
        options = webdriver.ChromeOptions()
        options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
        for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,1000", "--no-first-run", "--disable-extensions"]:
            options.add_argument(arg)
        service = Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
        self.driver = webdriver.Chrome(service=service, options=options)
        self.base, self.shots = base, shots

    def go(self, path):
        self.driver.get(self.base + path)

    def wait(self, what, seconds=30, refresh=False):
        deadline = time.time() + seconds
        while True:
            try:
                found = what(self.driver)
                if found:
                    return found
            except Exception:
                pass
            if time.time() > deadline:
                raise AssertionError(f"gave up waiting on {self.driver.current_url}:\n{self.driver.page_source[:4000]}")
            if refresh:
                self.driver.refresh()
            time.sleep(0.5)

    def text(self):
        return self.driver.find_element(By.TAG_NAME, "body").text

    def shot(self, name):
        if self.shots:
            self.driver.save_screenshot(os.path.join(self.shots, f"{name}.png"))

    def browser_errors(self):
        """Console errors of the page (a CSP violation shows up here)."""
        try:
            logs = self.driver.get_log("browser")
        except Exception:
            return []
        return [l for l in logs if l.get("level") == "SEVERE"]

    def close(self):
        self.driver.quit()


def main():
    binary, work = sys.argv[1], sys.argv[2]
    shots = sys.argv[3] if len(sys.argv) > 3 else None
    if shots:
        os.makedirs(shots, exist_ok=True)
    rig = Rig(binary, work)
    person = None
    try:
        person = Person(rig.base, shots)

        # 1. Sign in.
        person.go("/console")
        assert "/console/login" in person.driver.current_url
        person.shot("01-sign-in")
        person.driver.find_element(By.ID, "token").send_keys(ADMIN + Keys.ENTER)
        person.wait(lambda d: "/console/approvals" in d.current_url)
        assert "Nothing is waiting" in person.text()

        # 2. A held call arrives while a real MCP client waits on it.
        task = rig.start_task()
        status, _ = api(rig.base, "POST", f"/v1/tasks/{task['task_id']}/calls", task["access_token"],
                        {"tool": "warehouse.query", "arguments": {"sql": "SELECT count(*) AS n FROM customers"}})
        assert status == 200
        rows = [{"id": 201, "name": "Katherine Johnson", "email": "kj@example.com", "region": "us"}]
        out = {}
        client = threading.Thread(target=mcp_call, args=(rig.base + "/mcp", task["access_token"], "warehouse.insert",
                                                         {"table": "staging_customers", "rows": rows}, out))
        client.start()
        item = person.wait(lambda d: d.find_element(By.CSS_SELECTOR, "li.approval"), seconds=30, refresh=True)
        page = person.text()
        for expected in ["warehouse.insert", "loader-bot", GOAL, "Katherine Johnson", "needs approval"]:
            assert expected in page, (expected, page)
        assert person.driver.find_element(By.ID, "pending-count").text == "1"
        assert client.is_alive(), f"the client should still be waiting: {out}"
        person.shot("02-approvals")
        # Keyboard: the note field, then approve with the button's key.
        item.send_keys("n")
        note = person.driver.switch_to.active_element
        assert note.get_attribute("name") == "note"
        note.send_keys("checked the rows with the data team")
        item.find_element(By.CSS_SELECTOR, "button.approve").click()
        person.wait(lambda d: "Nothing is waiting" in d.find_element(By.TAG_NAME, "body").text)
        client.join(60)
        assert not client.is_alive(), "the client never got an answer"
        assert "result" in out, out
        result = out["result"]
        assert not result.get("isError"), result
        # While it waited, the client heard progress naming the request.
        assert out["progress"], out
        assert "elv_" in (out["progress"][0]["message"] or ""), out["progress"]
        assert "1" in json.dumps(result.get("structuredContent", result)), result

        # 3. Halt a task and watch the live stream show it.
        victim = rig.start_task()
        main_window = person.driver.current_window_handle
        person.go(f"/console/stream?task_id={victim['task_id']}")
        person.wait(lambda d: "Connected" in d.find_element(By.ID, "stream-status").text)
        person.driver.switch_to.new_window("tab")
        person.go(f"/console/tasks/{task['task_id']}")
        svg = person.driver.find_element(By.CSS_SELECTOR, "svg.workflow")
        # The task moved explore → work with the approved call: drawn.
        assert svg.find_elements(By.CSS_SELECTOR, "g.state.current"), "current state marked"
        assert svg.find_elements(By.CSS_SELECTOR, "path.edge.taken"), "path taken drawn"
        person.shot("04-task")
        person.go(f"/console/tasks/{victim['task_id']}")
        person.driver.find_element(By.ID, "halt-reason").send_keys("stuck in a retry loop")
        person.driver.find_element(By.CSS_SELECTOR, "form[action$='/halt'] button").click()
        person.wait(lambda d: "is halted" in d.find_element(By.TAG_NAME, "body").text)
        person.shot("05-task-halted")
        person.driver.switch_to.window(main_window)
        row = person.wait(lambda d: [r for r in d.find_elements(By.CSS_SELECTOR, "#stream tbody tr")
                                     if "task.halted" in r.text])
        assert "stuck in a retry loop" in row[0].text, row[0].text
        person.shot("06-live-stream")
        status, body = api(rig.base, "GET", f"/v1/tasks/{victim['task_id']}", ADMIN)
        assert body["status"] == "halted", body
        person.go("/console/tasks")
        person.shot("03-tasks")

        # 4. The upstream changes a tool's definition; approve it.
        rig.drift_upstream()
        person.go("/console/pins")
        person.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "section.drift"), seconds=90, refresh=True)
        diff = person.driver.find_element(By.CSS_SELECTOR, ".diff").text
        assert "description" in diff, diff
        status, body = api(rig.base, "POST", f"/v1/tasks/{task['task_id']}/calls", task["access_token"],
                           {"tool": "warehouse.query", "arguments": {"sql": "SELECT 1 AS one"}})
        assert status == 403 and body["error"] == "tool_definition_changed", body
        person.shot("07-pins-drift")
        person.driver.find_element(By.CSS_SELECTOR, "section.drift button.approve").click()
        person.wait(lambda d: not d.find_elements(By.CSS_SELECTOR, "section.drift"))
        status, body = api(rig.base, "POST", f"/v1/tasks/{task['task_id']}/calls", task["access_token"],
                           {"tool": "warehouse.query", "arguments": {"sql": "SELECT 1 AS one"}})
        assert status == 200, body

        # 5. The chain verifies.
        person.go("/console/chain")
        person.driver.find_element(By.CSS_SELECTOR, "form button.primary").click()
        person.wait(lambda d: "Intact" in d.find_element(By.ID, "verdict").text)
        person.shot("08-chain")

        errors = person.browser_errors()
        assert not errors, f"browser console errors (a CSP violation?): {errors}"
        print("ok")
    finally:
        if person:
            person.close()
        rig.close()


if __name__ == "__main__":
    main()
