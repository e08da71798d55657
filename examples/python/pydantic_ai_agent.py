"""Pydantic AI through the gateway, with no LLM: Pydantic AI's own
`FunctionModel` stands where the model would be and asks for one tool call
per turn; the tools are the gateway's, over MCP (`MCPToolset`), with the
task's tokens kept fresh by `task.auth` (an `httpx2.Auth`).

    python3 -m venv /tmp/pai && /tmp/pai/bin/pip install ./clients/python \\
        'mcp==2.3.0' 'pydantic-ai-slim[mcp]==2.68.0'
    /tmp/pai/bin/python examples/python/pydantic_ai_agent.py [--gateway URL]
"""

from __future__ import annotations

import argparse

from pydantic_ai import Agent
from pydantic_ai.mcp import MCPToolset
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    RetryPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from sidecar import AGENT, SECRET, sidecar

from portcullis_client import Task

# What a model would ask for, one call per turn. The last one is denied by
# the gateway's `no-sql-wildcards` policy.
SCRIPT = [
    ("warehouse.connect", {"database": "analytics"}),
    ("warehouse.query", {"sql": "select name from customers order by id limit 2"}),
    ("warehouse.query", {"sql": "select * from customers"}),
]


def answers(messages: list[ModelMessage]) -> list[ToolReturnPart | RetryPromptPart]:
    return [
        p
        for m in messages
        if isinstance(m, ModelRequest)
        for p in m.parts
        if isinstance(p, (ToolReturnPart, RetryPromptPart))
    ]


def scripted(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    done = len(answers(messages))
    if done >= len(SCRIPT):
        return ModelResponse(parts=[TextPart("finished")])
    name, args = SCRIPT[done]
    return ModelResponse(parts=[ToolCallPart(name, args, tool_call_id=f"call-{done}")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway")
    opts = parser.parse_args()
    with sidecar(opts.gateway) as gateway:
        with Task.start(gateway, AGENT, SECRET, "Pydantic AI example") as task:
            toolset = MCPToolset(f"{gateway}/mcp", auth=task.auth)
            agent = Agent(FunctionModel(scripted), toolsets=[toolset])
            result = agent.run_sync("summarise the customers")
    # The model is handed a denial as the tool's answer, in the gateway's
    # words: `denied: <reason>: <detail>` (DESIGN.md section 10).
    outcomes = answers(result.all_messages())
    kinds = []
    for (name, _), part in zip(SCRIPT, outcomes, strict=True):
        denied = "denied: " in str(part.content) or isinstance(part, RetryPromptPart)
        kinds.append("denied" if denied else "allowed")
        print(f"{kinds[-1]:>7}: {name} -> {str(part.content)[:100]}")
    if kinds != ["allowed", "allowed", "denied"] or "policy_forbid" not in str(outcomes[-1].content):
        raise SystemExit(f"unexpected outcome: {kinds}")
    print(f"model said: {result.output}")
    print("ok")


if __name__ == "__main__":
    main()
