"""One distribution `ti2i` with the import root `ti2i`: the wheel holds nothing else at top level,
no module in it imports a bare `client` / `export` / `engines` package, and it declares the `ti2i` command."""

from __future__ import annotations

import ast
import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_TOP_LEVEL = {"client", "export", "engines", "triton_models", "benchmarks", "tests"}
REQUIRED = ("ti2i/__init__.py", "ti2i/errors.py", "ti2i/spec.py", "ti2i/manifest.py", "ti2i/export/__init__.py",
            "ti2i/export/exporter.py", "ti2i/engines/__init__.py", "ti2i/app/cli.py", "ti2i/runner.py",
            "ti2i/triton_models/model.py", "ti2i/triton_models/repository.py")

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build from a clean copy of the working tree: an in-tree build would leave build/ and egg-info behind
    (and a stale build/lib can smuggle deleted modules into the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "work", "outputs"))
    out = tmp / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
         "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=150,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(out.glob("ti2i-*.whl"))
    assert len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return wheels[0]


@pytest.fixture(scope="module")
def names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def _dist_info(names: list[str]) -> str:
    infos = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    assert len(infos) == 1, infos
    return infos.pop()


def test_every_file_is_under_ti2i_or_dist_info(names: list[str]):
    info = _dist_info(names)
    assert info.startswith("ti2i-")
    outside = [n for n in names if n.split("/")[0] not in ("ti2i", info)]
    assert not outside, outside
    top = {n.split("/")[0] for n in names}
    assert not top & FORBIDDEN_TOP_LEVEL
    assert not any(n.endswith(".pyc") or "__pycache__" in n for n in names)


def test_required_modules_are_present(names: list[str]):
    for path in REQUIRED:
        assert path in names, path
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert {"ti2i", "ti2i/export", "ti2i/engines", "ti2i/client", "ti2i/triton_models"} <= packages


def test_top_level_and_entry_point(wheel: Path, names: list[str]):
    info = _dist_info(names)
    with zipfile.ZipFile(wheel) as archive:
        if f"{info}/top_level.txt" in names:
            assert archive.read(f"{info}/top_level.txt").decode().split() == ["ti2i"]
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    parser = configparser.ConfigParser()
    parser.optionxform = str  # keep the command's case
    parser.read_string(entry_points)
    assert dict(parser["console_scripts"]) == {"ti2i": "ti2i.app.cli:main"}
    assert "Name: ti2i" in metadata.splitlines()


def test_no_module_imports_a_bare_top_level_package(wheel: Path, names: list[str]):
    bad = []
    with zipfile.ZipFile(wheel) as archive:
        for name in names:
            if not name.endswith(".py"):
                continue
            tree = ast.parse(archive.read(name), filename=name)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                bad += [f"{name}:{node.lineno} imports {m}" for m in modules
                        if m.split(".")[0] in FORBIDDEN_TOP_LEVEL]
    assert not bad, bad


def test_installed_wheel_imports_from_its_own_files(wheel: Path, tmp_path: Path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "-q",
                    "--target", str(target), str(wheel)], check=True, capture_output=True, timeout=120)
    installed = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert installed == {"ti2i", "bin"}, installed  # the package and the `ti2i` command, nothing else
    assert (target / "bin" / "ti2i").is_file()
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import ti2i, ti2i.client.cli, ti2i.spec, ti2i.manifest, ti2i.errors\n"
        "from pathlib import Path\n"
        "assert Path(ti2i.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), ti2i.__file__\n"
        "assert Path(ti2i.client.cli.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve())\n"
        "import importlib.util\n"
        "for bare in ('client', 'export', 'engines', 'triton_models', 'benchmarks'):\n"
        "    spec = importlib.util.find_spec(bare)\n"
        "    assert spec is None or not str(spec.origin).startswith(sys.argv[1]), bare\n"
        "print(ti2i.client.cli.build_parser().prog)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ti2i"
