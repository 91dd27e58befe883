"""Drives one MCP session against a Portcullis endpoint with the official MCP Python SDK.

The end-to-end tests run it as a subprocess, once per protocol generation:

    python drive_session.py --url http://127.0.0.1:8080/mcp/demo/notes --api-key "$KEY" \
        --generation 2025 --tool notes.list_notes
    python drive_session.py --url ... --api-key "$KEY" --generation 2026 --tool notes.add_note \
        --tool-args '{"title": "t", "body": "b"}' --resource notes+notes://index \
        --prompt notes.summarize_note --prompt-args '{"id": "1"}'

Generations (mcp==2.3.0, see requirements.txt):
  2025  `Client(mode="legacy")`: the initialize handshake (offering 2025-11-25, or the version
        given with --protocol-version), an Mcp-Session-Id, and `logging/setLevel` (--log-level,
        default debug) when the server advertises logging.
  2026  `Client(mode="auto")`: a `server/discover` probe at 2026-07-28, then every request carries
        the `_meta` envelope (protocolVersion, clientInfo, clientCapabilities, logLevel).
        The SDK falls back to initialize when the probe fails, so a fallback is reported as an
        error. `--skip-discover` pins 2026-07-28 without the probe (`mode="2026-07-28"`).

Every HTTP request carries `X-API-Key: <key>` (headers of the httpx2 client handed to the
transport). Prints one JSON object on stdout and exits 0 (a tool result with isError is a
result, not an error); on any error prints it to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from typing import Any

import anyio
import httpx2
import mcp.client.session as mcp_client_session
import mcp_types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

# Logging (setLevel, per-request logLevel) is deprecated at 2026-07-28 yet still what we test.
warnings.simplefilter("ignore", MCPDeprecationWarning)


def dump(model: Any) -> Any:
    """A pydantic model as its wire JSON (camelCase; only the fields the server sent, not SDK defaults)."""
    return model.model_dump(by_alias=True, mode="json", exclude_none=True, exclude_unset=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="MCP endpoint, e.g. http://127.0.0.1:8080/mcp/demo/notes")
    parser.add_argument("--api-key", required=True, help="sent as X-API-Key on every request")
    parser.add_argument("--generation", required=True, choices=["2025", "2026"])
    parser.add_argument("--tool", required=True, help="tool to call")
    parser.add_argument("--tool-args", default="{}", help="JSON object of tool arguments")
    parser.add_argument("--resource", help="resource URI to list and read")
    parser.add_argument("--prompt", help="prompt to get")
    parser.add_argument("--prompt-args", default="{}", help="JSON object of prompt arguments (strings)")
    parser.add_argument(
        "--protocol-version",
        help="2025 only: the version offered in initialize (default: the SDK's, 2025-11-25)",
    )
    parser.add_argument(
        "--skip-discover", action="store_true", help="2026 only: adopt 2026-07-28 without server/discover"
    )
    parser.add_argument(
        "--log-level",
        default="debug",
        choices=["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"],
        help="logging/setLevel (2025) or the per-request _meta logLevel (2026); default debug",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="overall time limit in seconds")
    args = parser.parse_args(argv)
    for name in ("tool_args", "prompt_args"):
        value = json.loads(getattr(args, name))
        if not isinstance(value, dict):
            parser.error(f"--{name.replace('_', '-')} must be a JSON object")
        setattr(args, name, value)
    if args.protocol_version is not None:
        if args.generation != "2025":
            parser.error("--protocol-version applies to --generation 2025 only")
        if args.protocol_version not in HANDSHAKE_PROTOCOL_VERSIONS:
            parser.error(f"--protocol-version must be one of {list(HANDSHAKE_PROTOCOL_VERSIONS)}")
    if args.skip_discover and args.generation != "2026":
        parser.error("--skip-discover applies to --generation 2026 only")
    return args


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    progress: list[dict[str, Any]] = []
    logs: list[dict[str, Any]] = []
    notifications: list[str] = []
    http_errors: list[str] = []
    http: dict[str, Any] = {"sessionIds": [], "protocolVersionHeaders": [], "requests": 0, "unkeyedRequests": 0}

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append({"progress": value, "total": total, "message": message})

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(dump(params))

    async def on_message(message: Any) -> None:
        if isinstance(message, Exception):
            print(f"transport error: {message!r}", file=sys.stderr)
            return
        method = getattr(getattr(message, "root", message), "method", None)
        if method is not None:
            notifications.append(method)

    # What went over the wire, so the test can check the generation independently of the SDK.
    async def on_request(request: httpx2.Request) -> None:
        http["requests"] += 1
        if request.headers.get("x-api-key") != args.api_key:
            http["unkeyedRequests"] += 1
        version = request.headers.get("mcp-protocol-version")
        if version and version not in http["protocolVersionHeaders"]:
            http["protocolVersionHeaders"].append(version)

    async def on_response(response: httpx2.Response) -> None:
        session_id = response.headers.get("mcp-session-id")
        if session_id and session_id not in http["sessionIds"]:
            http["sessionIds"].append(session_id)
        if response.status_code >= 400:
            # The SDK turns a bare HTTP error into a generic JSON-RPC error; keep what the gateway said.
            body = (await response.aread()).decode("utf-8", "replace")[:500]
            line = f"HTTP {response.status_code} for {response.request.method} {response.request.url}: {body}"
            http_errors.append(line)
            print(line, file=sys.stderr)

    if args.generation == "2025":
        mode = "legacy"
        if args.protocol_version is not None:
            # ClientSession.initialize() always offers this module constant; there is no parameter.
            mcp_client_session.LATEST_HANDSHAKE_VERSION = args.protocol_version
    else:
        mode = MODERN_PROTOCOL_VERSIONS[-1] if args.skip_discover else "auto"

    out: dict[str, Any] = {}
    async with httpx2.AsyncClient(
        headers={"X-API-Key": args.api_key},
        timeout=httpx2.Timeout(30.0, read=300.0),
        event_hooks={"request": [on_request], "response": [on_response]},
    ) as http_client:
        client = Client(
            streamable_http_client(args.url, http_client=http_client),
            mode=mode,
            logging_callback=on_log,
            message_handler=on_message,
            # 2026-07-28: stamped as io.modelcontextprotocol/logLevel in every request's _meta.
            # Ignored on handshake-era connections (logging/setLevel below instead).
            log_level=args.log_level,
            client_info=types.Implementation(name="portcullis-e2e-python", version="1"),
            cache=None,
            raise_exceptions=True,
        )
        async with client:
            version = client.protocol_version
            if args.generation == "2026" and version not in MODERN_PROTOCOL_VERSIONS:
                raise RuntimeError(f"asked for 2026-07-28 but the SDK fell back to the handshake at {version}")
            if args.generation == "2025" and version not in HANDSHAKE_PROTOCOL_VERSIONS:
                raise RuntimeError(f"asked for a 2025 version but negotiated {version}")
            out["protocolVersion"] = version
            capabilities = client.server_capabilities
            out["serverInfo"] = dump(client.server_info) if client.server_info is not None else None

            logging_state = f"per-request {args.log_level}" if args.generation == "2026" else "not advertised"
            if args.generation == "2025" and capabilities.logging is not None:
                await client.set_logging_level(args.log_level)
                logging_state = f"setLevel {args.log_level}"
            out["logging"] = logging_state

            tools = await client.list_tools()
            out["tools"] = [tool.name for tool in tools.tools]
            result = await client.call_tool(args.tool, args.tool_args, progress_callback=on_progress)
            out["call"] = dump(result)

            if args.resource is not None:
                uris: list[str] = []
                cursor: str | None = None
                while True:
                    page = await client.list_resources(cursor=cursor)
                    uris.extend(str(resource.uri) for resource in page.resources)
                    cursor = page.next_cursor
                    if cursor is None:
                        break
                out["resources"] = uris
                out["read"] = dump(await client.read_resource(args.resource))
            if args.prompt is not None:
                prompt_args = {key: str(value) for key, value in args.prompt_args.items()}
                out["prompt"] = dump(await client.get_prompt(args.prompt, prompt_args or None))

            # Let notifications that raced the last response land before closing.
            await anyio.sleep(0.2)

    out["progress"] = progress
    out["logs"] = logs
    out["notifications"] = notifications
    out["http"] = http
    out["httpErrors"] = http_errors
    return out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        out = anyio.run(_with_timeout, args)
    except Exception as error:  # includes exception groups from the SDK's task groups
        print(f"drive_session.py failed ({args.generation}): {error!r}", file=sys.stderr)
        for detail in _leaves(error):
            if detail is not error:
                print(f"  cause: {detail!r}", file=sys.stderr)
        traceback.print_exception(error, file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


async def _with_timeout(args: argparse.Namespace) -> dict[str, Any]:
    with anyio.fail_after(args.timeout):
        return await drive(args)


def _leaves(error: BaseException) -> list[BaseException]:
    """The innermost exceptions of a (possibly nested) exception group."""
    inner = getattr(error, "exceptions", None)  # BaseExceptionGroup (builtin from 3.11, backport on 3.10)
    if isinstance(inner, (list, tuple)):
        return [leaf for exception in inner for leaf in _leaves(exception)]
    return [error]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
