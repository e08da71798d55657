"""A minimal MCP server from the official Python SDK, for the load harness's smoke test.

Serves one tool, `echo`, over Streamable HTTP at http://127.0.0.1:PORT/mcp.
Usage: python3 echo_server.py PORT
"""

import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

server = MCPServer("bench")


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


if __name__ == "__main__":
    uvicorn.run(
        server.streamable_http_app(),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
    )
