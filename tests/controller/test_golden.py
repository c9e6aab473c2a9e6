"""Golden files: manifests in -> Envoy bootstrap, statuses and explain out; Envoy validates each.

Each directory under ``cases/`` holds ``input.yaml`` (rendered together with ``cases/common.yaml``)
and the expected ``envoy.yaml``, ``status.yaml`` and ``explain.txt``. Regenerate them after an
intended change with::

    EXTSVC_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/controller -q
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from extsvc.testing.harness import envoy_binary
from extsvc_controller import render
from extsvc_controller.cli import main
from extsvc_controller.sources.files import load
from extsvc_controller.translate import Translation, translate

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases"
COMMON = CASES / "common.yaml"
NAMES = sorted(p.name for p in CASES.iterdir() if p.is_dir())
REGEN = os.environ.get("EXTSVC_REGEN_GOLDEN") == "1"
INVALID = {
    "allowed-routes-selector",
    "crossns-nogrant",
    "failures",
    "gateway-invalid",
    "https",
    "security-fail-closed",
}


def run(case: str) -> Translation:
    return translate(load([COMMON, CASES / case]))


def outputs(case: str) -> dict[str, str]:
    result = run(case)
    return {
        "envoy.yaml": render.bootstrap_yaml(result),
        "status.yaml": render.statuses_yaml(result.statuses),
        "explain.txt": render.explain_text(result.explain),
    }


def validate(path: Path) -> tuple[Path, int, str]:
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return path, proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("case", NAMES)
def test_golden(case: str) -> None:
    got = outputs(case)
    for name, text in got.items():
        golden = CASES / case / name
        if REGEN:
            golden.write_text(text, encoding="utf-8")
        assert golden.read_text(encoding="utf-8") == text, (
            f"{case}/{name} differs (EXTSVC_REGEN_GOLDEN=1 rewrites)"
        )
    assert run(case).ok is (case not in INVALID)


@pytest.mark.envoy
def test_every_golden_bootstrap_passes_envoy_validate() -> None:
    paths = [CASES / case / "envoy.yaml" for case in NAMES]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(validate, paths))
    failed = [f"{p.parent.name}: {out[-600:]}" for p, rc, out in results if rc != 0]
    assert not failed, "\n".join(failed)


def test_translation_is_deterministic() -> None:
    for case in ("merge", "providers", "failures"):
        assert outputs(case) == outputs(case)


def test_cli_render_writes_bootstrap_and_exits_nonzero_on_invalid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "envoy.yaml"
    assert main(["render", "-f", str(COMMON), "-f", str(CASES / "disable"), "-o", str(out)]) == 0
    assert out.read_text() == (CASES / "disable" / "envoy.yaml").read_text()
    assert "kind: TrafficPolicy" in capsys.readouterr().err
    assert main(["render", "-f", str(COMMON), "-f", str(CASES / "failures"), "-o", str(out)]) == 1


def test_cli_explain_one_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-f", str(COMMON), "-f", str(CASES / "disable"), "demo/shop/public"]) == 0
    text = capsys.readouterr().out
    assert "demo/shop rule 1 (public)" in text
    assert "runs global_disable/ext_auth" in text
    assert "skip ext_auth/demo/authz" in text
    assert main(["explain", "-f", str(COMMON), "demo/nothere"]) == 1


@pytest.mark.envoy
def test_cli_render_secret_dir_writes_keys_as_files(tmp_path: Path) -> None:
    """With --secret-dir the bootstrap names files instead of holding the key."""
    out, secrets = tmp_path / "envoy.yaml", tmp_path / "secrets"
    args = ["render", "-f", str(COMMON), "-f", str(CASES / "https"), "-o", str(out)]
    assert main([*args, "--secret-dir", str(secrets), "--status", str(tmp_path / "status.yaml")]) == 1
    text = out.read_text()
    assert "inline_bytes" not in text
    assert f"filename: {secrets}/demo/shop-cert/tls.key" in text
    key = secrets / "demo" / "shop-cert" / "tls.key"
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert key.stat().st_mode & 0o777 == 0o600
    assert not (secrets / "certs" / "legacy-cert").exists()  # not granted: not written
    _, rc, output = validate(out)
    assert rc == 0, output
