"""LangGraph through the gateway, via `langchain-mcp-adapters`, with no LLM:
a scripted planner node stands where the model would be and asks for one
tool call per turn; LangGraph's `ToolNode` runs them as MCP tools.

`langchain-mcp-adapters` speaks MCP through the 1.x SDK and `httpx`;
`task.auth` is an `httpx.Auth`, so it goes in the connection as it is and
keeps the task's token fresh on every request.

    python3 -m venv /tmp/lg && /tmp/lg/bin/pip install ./clients/python \\
        'langchain-mcp-adapters==0.3.2' 'langgraph==1.2.22'
    /tmp/lg/bin/python examples/python/langgraph_agent.py [--gateway URL]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_mcp_adapters.client import MultiServerMCPClient
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from sidecar import AGENT, SECRET, sidecar

from portcullis_client import Task

# What a model would ask for, one call per turn. The last one is denied by
# the gateway's `no-sql-wildcards` policy.
SCRIPT = [
    ("warehouse.connect", {"database": "analytics"}),
    ("warehouse.query", {"sql": "select name from customers order by id limit 2"}),
    ("warehouse.query", {"sql": "select * from customers"}),
]


def planner(state: MessagesState) -> dict[str, Any]:
    done = sum(isinstance(m, ToolMessage) for m in state["messages"])
    if done >= len(SCRIPT):
        return {"messages": [AIMessage(content="finished")]}
    name, args = SCRIPT[done]
    call = {"name": name, "args": args, "id": f"call-{done}", "type": "tool_call"}
    return {"messages": [AIMessage(content="", tool_calls=[call])]}


def route(state: MessagesState) -> str:
    last = state["messages"][-1]
    return "tools" if isinstance(last, AIMessage) and last.tool_calls else END


async def run(gateway: str, task: Task) -> list[ToolMessage]:
    client = MultiServerMCPClient(
        {"gateway": {"transport": "streamable_http", "url": f"{gateway}/mcp", "auth": task.auth}}
    )
    tools = await client.get_tools()
    print(f"tools: {sorted(t.name for t in tools)}")
    graph = StateGraph(MessagesState)
    graph.add_node("planner", planner)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "planner")
    graph.add_conditional_edges("planner", route, ["tools", END])
    graph.add_edge("tools", "planner")
    final = await graph.compile().ainvoke({"messages": []})
    return [m for m in final["messages"] if isinstance(m, ToolMessage)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway")
    opts = parser.parse_args()
    with sidecar(opts.gateway) as gateway:
        with Task.start(gateway, AGENT, SECRET, "LangGraph example") as task:
            results = asyncio.run(run(gateway, task))
    for (name, _), message in zip(SCRIPT, results, strict=True):
        print(f"{message.status:>7}: {name} -> {str(message.content)[:100]}")
    statuses = [m.status for m in results]
    if statuses != ["success", "success", "error"] or "policy_forbid" not in str(results[-1].content):
        raise SystemExit(f"unexpected outcome: {statuses}")
    print("ok")


if __name__ == "__main__":
    main()
