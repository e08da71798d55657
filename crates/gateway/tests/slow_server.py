"""A minimal stdio MCP server (handshake era) for the cancellation tests.

Its one tool, `slow`, never answers; every `notifications/cancelled` it
receives is appended to the file named by argv[1], one requestId per line.
Standard library only, so it runs wherever python3 does.
"""
import json
import sys

log_path = sys.argv[1]


def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    method = msg.get("method")
    mid = msg.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": mid, "result": {
            "protocolVersion": "2025-11-25",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "slow", "version": "1"}}})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": mid, "result": {"tools": [{
            "name": "slow", "description": "Never answers.",
            "inputSchema": {"type": "object"}}]}})
    elif method == "notifications/cancelled":
        with open(log_path, "a") as f:
            f.write(str(msg["params"]["requestId"]) + "\n")
    elif method == "tools/call":
        pass  # never answered
    elif mid is not None:
        send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "Method not found"}})
