"""Connects the official MCP Python SDK to a Portcullis endpoint in both protocol generations.

    pip install 'mcp==2.3.0'
    python examples/clients/python_sdk.py http://127.0.0.1:8080/mcp/demo/notes "$(cat .portcullis/secrets/demo/analyst-key)"

For each generation it prints the negotiated protocol version and the visible tools, calls one
tool, and shows the error a hidden tool gives (the same as for a tool that does not exist).
"""

import asyncio
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def session(url: str, key: str, mode: str) -> None:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            tools = sorted(t.name for t in (await client.list_tools()).tools)
            print(f"[{mode}] protocol {client.protocol_version}: {len(tools)} tools: {', '.join(tools)}")
            result = await client.call_tool("notes.add_note", {"title": "from python", "body": mode})
            print(f"[{mode}] notes.add_note -> {result.content[0].text}")
            for name in ("notes.delete_note", "notes.no_such_tool"):
                try:
                    outcome = await client.call_tool(name, {"id": 1})
                    print(f"[{mode}] {name} -> unexpected result {outcome}")
                except Exception as error:  # the SDK raises the JSON-RPC error
                    print(f"[{mode}] {name} -> {type(error).__name__}: {error}")


async def main() -> None:
    url, key = sys.argv[1], sys.argv[2]
    for mode in ("2026-07-28", "legacy"):
        await session(url, key, mode)


asyncio.run(main())
