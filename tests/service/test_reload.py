"""Hot reload through the watched file: swap on a good change, keep the last good one on a bad one."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from extsvc.testing import ScriptPlugin

from .conftest import Serve, Served, eventually, series, write_file


def tagged(tag: str, answer: str = "allow") -> str:
    return f"""
default_policy: p
policies:
  p:
    steps:
      - {{plugin: script, config: {{answer: {answer}, tag: {tag}}}}}
"""


def tag_of(response: Any) -> str:
    return str({h.header.key: h.header.value for h in response.ok_response.headers}["x-tag"])


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "extsvc.yaml"
    write_file(path, tagged("v1"))
    return path


async def test_a_good_change_is_swapped_in_as_a_new_generation(
    serve: Serve, config: Path, script: ScriptPlugin
) -> None:
    async with serve(config, reload_interval_s=0.05) as served:
        assert tag_of(await served.check()) == "v1"
        write_file(config, tagged("v2"))
        await eventually(lambda: served.generation == 2, what="generation 2")
        assert tag_of(await served.check()) == "v2"
        assert served.sample("extsvc_config_reloads_total", result="ok") == 2
        # The retired generation's steps are closed once nothing runs on them.
        await eventually(lambda: script.closed == ["v1"], what="v1 closed")


async def test_an_edit_in_place_is_seen_too(serve: Serve, config: Path) -> None:
    async with serve(config, reload_interval_s=0.05) as served:
        config.write_text(tagged("v2-longer"))  # same inode, other size
        await eventually(lambda: served.generation == 2, what="generation 2")
        assert tag_of(await served.check()) == "v2-longer"


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        pytest.param(
            tagged("v2").replace("answer: allow", "answer: perhaps"),
            "policies.p.steps[0].config.answer",
            id="plugin-config-field",
        ),
        pytest.param(
            tagged("v2").replace("plugin: script", "plugin: scirpt"),
            "policies.p.steps[0].plugin: unknown plugin kind 'scirpt'",
            id="unknown-plugin",
        ),
        pytest.param(tagged("v2").replace("steps:", "stpes:"), "policies.p.stpes", id="typo"),
        pytest.param(
            tagged("v2").replace("default_policy: p", "default_policy: q"),
            "default_policy: 'q' is not one of policies",
            id="dangling-default",
        ),
        pytest.param("policies: {p: [\n", "not valid YAML", id="yaml"),
    ],
)
async def test_a_bad_file_is_rejected_counted_logged_and_the_last_good_one_keeps_serving(
    serve: Serve, config: Path, caplog: pytest.LogCaptureFixture, bad: str, named: str
) -> None:
    async with serve(config, reload_interval_s=0.05) as served:
        write_file(config, bad)
        await eventually(
            lambda: served.sample("extsvc_config_reloads_total", result="error") == 1,
            what="the reload error counted",
        )
        assert served.generation == 1
        assert tag_of(await served.check()) == "v1"
        metrics = await served.scrape()
        assert metrics[series("extsvc_config_reloads_total", result="error")] == 1
        assert (await served.admin("/readyz")).status_code == 200  # still ready on v1

        errors = [
            r.getMessage() for r in caplog.records
            if r.name == "extsvc.reload.provider" and r.levelno == logging.ERROR
        ]
        assert len(errors) == 1
        assert named in errors[0]
        assert "keeping generation 1" in errors[0]

        write_file(config, tagged("v3"))  # fixing the file recovers
        await eventually(lambda: served.generation == 2, what="generation 2")
        assert tag_of(await served.check()) == "v3"


async def test_a_deleted_file_is_reported_once_and_serving_goes_on(
    serve: Serve, config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(config, reload_interval_s=0.02) as served:
        os.unlink(config)
        await eventually(
            lambda: served.sample("extsvc_config_reloads_total", result="error") == 1,
            what="the missing file counted",
        )
        await asyncio.sleep(0.1)  # several more polls
        assert served.sample("extsvc_config_reloads_total", result="error") == 1
        assert "the file is gone" in caplog.text
        assert tag_of(await served.check()) == "v1"


async def test_a_request_in_flight_finishes_on_the_generation_it_started_on(
    serve: Serve, config: Path, script: ScriptPlugin
) -> None:
    write_file(config, tagged("v1", answer="wait"))
    async with serve(config, reload_interval_s=0.02) as served:
        in_flight = asyncio.create_task(served.check())
        await asyncio.wait_for(script.entered.wait(), 5)
        write_file(config, tagged("v2"))
        await eventually(lambda: served.generation == 2, what="generation 2")
        assert tag_of(await served.check()) == "v2"  # new requests see the new config at once
        assert script.closed == []  # v1 is still in use
        script.release.set()
        assert tag_of(await in_flight) == "v1"
        await eventually(lambda: script.closed == ["v1"], what="v1 closed after its last request")


async def test_the_reload_metrics_over_http(serve: Serve, config: Path) -> None:
    async def scraped(served: Served, result: str) -> float:
        return (await served.scrape()).get(series("extsvc_config_reloads_total", result=result), 0)

    async with serve(config, reload_interval_s=0.05) as served:
        write_file(config, "version: 7\n")
        await eventually(lambda: served.sample("extsvc_config_reloads_total", result="error") == 1)
        write_file(config, tagged("v2"))
        await eventually(lambda: served.generation == 2)
        assert (await scraped(served, "ok"), await scraped(served, "error")) == (2, 1)
        assert (await served.scrape())[series("extsvc_config_generation")] == 2


async def test_status_shows_the_serving_generation_and_the_last_rejected_load(
    serve: Serve, config: Path
) -> None:
    async with serve(config, reload_interval_s=0.05) as served:
        status = (await served.admin("/status")).json()
        assert status["serving"]["generation"] == 1 and status["serving"]["source"] == str(config)
        assert status["serving"]["load_seconds"] >= 0 and status["last_rejected"] is None
        write_file(config, tagged("v2").replace("plugin: script", "plugin: scirpt"))
        await eventually(
            lambda: served.sample("extsvc_config_reloads_total", result="error") == 1,
            what="the reload error counted",
        )
        status = (await served.admin("/status")).json()
        rejected = status["last_rejected"]
        assert status["generation"] == 1 and rejected["serving_generation"] == 1
        assert rejected["source"] == str(config) and rejected["problem_count"] == 1
        assert "unknown plugin kind 'scirpt'" in rejected["problems"][0]
        write_file(config, tagged("v3"))
        await eventually(lambda: served.generation == 2, what="generation 2")
        status = (await served.admin("/status")).json()
        assert status["last_rejected"] is None and status["serving"]["generation"] == 2
