"""A minimal stdio MCP server (handshake era) that keeps state per session.

One process is one session. Tools: `remember` stores its `value` argument
in the process; `recall` answers what this session remembered, and the
process id. Standard library only.
"""
import json
import os
import sys

memory = []


def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def tools():
    obj = {"type": "object", "properties": {"value": {"type": "string"}}}
    return [
        {"name": "remember", "description": "Remember a value in this session.", "inputSchema": obj},
        {"name": "recall", "description": "What this session remembered.", "inputSchema": {"type": "object"}},
    ]


for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    method, mid = msg.get("method"), msg.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": mid, "result": {
            "protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
            "serverInfo": {"name": "sessions", "version": "1"}}})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": mid, "result": {"tools": tools()}})
    elif method == "tools/call":
        name = msg["params"]["name"]
        if name == "remember":
            memory.append(msg["params"].get("arguments", {}).get("value", ""))
        out = {"remembered": memory, "pid": os.getpid()}
        send({"jsonrpc": "2.0", "id": mid, "result": {
            "content": [{"type": "text", "text": json.dumps(out)}], "structuredContent": out}})
    elif mid is not None:
        send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "Method not found"}})
