"""docs/plugins.md's plugin package ("Testing a plugin"), built and tested the way its author would.

The blocks marked ``<!-- file: PATH -->`` in docs/plugins.md are written to a temporary folder,
the package is installed with pip (``--target`` a temporary folder put on ``PYTHONPATH``: the
shared virtualenv is never touched, and importlib.metadata finds the entry point there), and its
own tests run with plain ``python -m pytest`` in the package's folder, under the pytest settings
of its own pyproject.toml.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
FILE_BLOCK = re.compile(r"^<!-- file: (\S+) -->\n```\w*\n(.*?)^```", re.S | re.M)
PACKAGE = "acme-hello"


def doc_files() -> dict[str, str]:
    """``{path: content}`` of every marked block of docs/plugins.md."""
    files: dict[str, str] = {}
    for path, body in FILE_BLOCK.findall(PLUGINS_DOC.read_text(encoding="utf-8")):
        assert path not in files, f"docs/plugins.md has two blocks for {path}"
        files[path] = body
    return files


def count_tests(source: str) -> int:
    return len(re.findall(r"^(?:async )?def test_", source, re.M))


@dataclass(frozen=True)
class Installed:
    root: Path
    site: Path
    env: dict[str, str]

    @property
    def project(self) -> Path:
        return self.root / PACKAGE

    def run(self, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *argv], cwd=cwd or self.project, env=self.env,
            capture_output=True, text=True, timeout=120, check=False,
        )


def test_the_docs_hold_the_whole_package() -> None:
    files = doc_files()
    assert set(files) == {
        f"{PACKAGE}/pyproject.toml",
        f"{PACKAGE}/acme_hello/__init__.py",
        f"{PACKAGE}/acme_hello/plugin.py",
        f"{PACKAGE}/tests/test_hello.py",
        f"{PACKAGE}/tests/test_envoy.py",
        f"{PACKAGE}/tests/envoy.yaml",
    }
    pyproject = files[f"{PACKAGE}/pyproject.toml"]
    assert 'asyncio_mode = "auto"' in pyproject  # what makes the async tests run at all
    assert "load_entry_points" not in files[f"{PACKAGE}/tests/test_hello.py"]  # the obvious call


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    import hatchling  # noqa: F401 (the example's build backend, locked in requirements/requirements-dev.txt)
    root = tmp_path_factory.mktemp("author")
    for relative, body in doc_files().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
    site = root / "site-packages"
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "EXTSVC_PLUGINS_")) and k != "PYTHONPATH"
    }
    env["PYTHONPATH"] = str(site)
    done = Installed(root, site, env)
    # What `pip install .` does, offline: the backend is already installed (no build isolation),
    # extsvc too (no deps).
    result = done.run(
        "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
        "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), str(done.project),
        cwd=root,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return done


def test_pip_installed_the_entry_point(installed: Installed) -> None:
    code = (
        "from importlib.metadata import entry_points\n"
        "[ep] = entry_points(group='extsvc', name='acme-hello')\n"
        "print(ep.value, ep.dist.name, ep.dist.version)\n"
        "import acme_hello.plugin; print(acme_hello.plugin.__file__)\n"
    )
    result = installed.run("-c", code, cwd=installed.root)  # not the project: the installed copy
    assert result.returncode == 0, result.stderr
    first, location = result.stdout.splitlines()
    assert first == "acme_hello.plugin acme-hello 0.1.0"
    assert Path(location).is_relative_to(installed.site)


def test_extsvc_plugins_list_shows_the_installed_plugin(installed: Installed) -> None:
    result = installed.run("-m", "extsvc", "plugins", "list")
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("acme-hello ")]
    assert "entry point (acme-hello 0.1.0)" in line and "kinds: hello" in line


def _summary(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else result.stderr


def test_the_packages_own_tests_pass(installed: Installed) -> None:
    result = installed.run("-m", "pytest", "-m", "not envoy")
    expected = count_tests(doc_files()[f"{PACKAGE}/tests/test_hello.py"])
    summary = _summary(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"\b{expected} passed\b", summary), summary
    assert not re.search(r"failed|error|skipped", summary), summary


@pytest.mark.envoy
def test_the_packages_envoy_test_passes(installed: Installed) -> None:
    result = installed.run("-m", "pytest", "-m", "envoy")
    expected = count_tests(doc_files()[f"{PACKAGE}/tests/test_envoy.py"])
    summary = _summary(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"\b{expected} passed\b", summary), summary
    assert not re.search(r"failed|error|skipped", summary), summary
