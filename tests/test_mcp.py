"""The app as MCP tools: `python app.py --mcp` for real, through the `mcp` package's own client
(streamable HTTP at /gradio_api/mcp/): the tools on offer, their descriptions, and a compare call
on an example photo sent as a base64 data URL, without a progress token (as most clients call)."""
from __future__ import annotations

import asyncio
import base64
import json
from datetime import timedelta

import pytest

import app_server
from conftest import ROOT, SHARED_DATA
from test_app import check_answer

EXAMPLE = ROOT / "examples" / "american_crow__1.jpg"


@pytest.fixture(scope="module")
def mcp_url(app_checkpoints, pytestconfig, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("mcp_app")
    url = app_server.app_url(app_checkpoints, app_server.example_folder(SHARED_DATA, tmp), pytestconfig, tmp,
                             args=["--mcp"])
    return url + "gradio_api/mcp/"


def with_session(url: str, work):
    """Run `await work(session)` in an initialised MCP client session."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def run():
        async with streamable_http_client(url) as (read, write, _), ClientSession(read, write) as session:
            await session.initialize()
            return await work(session)

    return asyncio.run(run())


def data_url(path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def call(url: str, tool: str, arguments: dict):
    return with_session(url, lambda s: s.call_tool(tool, arguments, read_timeout_seconds=timedelta(seconds=300)))


def test_the_public_events_are_the_tools_described_by_their_docstrings(mcp_url):
    async def tools(session):
        return {t.name: t for t in (await session.list_tools()).tools}

    offered = with_session(mcp_url, tools)
    assert set(offered) == {"compare", "batch", "test_maps"}  # the private events (maps, sets, examples) are no tools
    compare = offered["compare"]
    assert compare.description.startswith("Name the bird species in one photo with three classifiers")
    assert '"top5": T' in compare.description and "Returns:" in compare.description
    assert list(compare.inputSchema["properties"]) == ["image"] and compare.inputSchema["required"] == ["image"]
    assert compare.inputSchema["properties"]["image"]["description"].startswith("the bird photo")
    assert list(offered["batch"].inputSchema["properties"]) == ["files"]
    assert list(offered["test_maps"].inputSchema["properties"]) == ["image", "species"]
    assert "deletion test" in offered["test_maps"].description


def test_compare_answers_an_example_photo_with_json_and_three_maps(mcp_url):
    result = call(mcp_url, "compare", {"image": data_url(EXAMPLE)})
    assert not result.isError, result.content
    answer = json.loads(result.content[0].text)  # JSON, not Python's repr of a dict
    check_answer(answer)
    assert answer["models"]["cnn"]["top5"][0][0] == "American Crow"
    images = [c for c in result.content if c.type == "image"]
    assert len(images) == 3 and all(c.mimeType.startswith("image/") and c.data for c in images)


def test_a_file_that_is_no_photo_gets_the_error_answer(mcp_url):
    note = "data:image/jpeg;base64," + base64.b64encode(b"a shopping list, not a photo").decode()
    result = call(mcp_url, "compare", {"image": note})
    assert not result.isError, result.content
    assert set(json.loads(result.content[0].text)) == {"error"}


def test_birdfg_mcp_env_turns_the_mcp_server_on_for_a_space(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("birdfg_app", ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    monkeypatch.delenv("BIRDFG_MCP", raising=False)
    assert app.parse_args([]).mcp is False and app.parse_args(["--mcp"]).mcp is True
    monkeypatch.setenv("BIRDFG_MCP", "1")
    assert app.parse_args([]).mcp is True
