"""The installed package: one top-level name, `plm`, and nothing generic (`service`, `models`, ...) beside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_exactly_one_top_level_package(tmp_path: Path) -> None:
    # From a copy without build/: setuptools reuses build/lib, where a package dropped from the list would linger.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "cache", "repository",
                                                             "results", "__pycache__", "*.egg-info", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("plm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"plm"}, top
    dist_info = next(t for t in top if t.endswith(".dist-info"))
    assert "plm" in zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    # every folder of the layout ships, with the generated API
    for module in ("plm/cli.py", "plm/api/v1/plm_pb2.py", "plm/service/server.py", "plm/service/contract/manifest.py",
                   "plm/service/dataplane/plane.py", "plm/service/generation/engine.py", "plm/models/gpt.py",
                   "plm/data/corpus.py", "plm/export/build.py", "plm/client/client.py"):
        assert module in names, module


def test_every_listed_package_is_a_folder_of_the_repository() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = config["package-dir"]
    for package in config["packages"]:
        head = max((p for p in dirs if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / dirs[head] / Path(*package[len(head):].strip(".").split(".") if package != head else ())
        assert (folder / "__init__.py").is_file(), f"{package}: {folder} has no __init__.py"
    # and every package folder under the mapped roots is listed (a new sub-package must not be left out)
    for head, root in dirs.items():
        for init in (ROOT / root).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / root)
            package = ".".join((head, *rel.parts)) if rel.parts else head
            assert package in config["packages"], f"{init.parent} is not in [tool.setuptools] packages"


def test_generic_names_are_not_importable() -> None:
    for name in ("service", "models", "export", "client", "data"):
        r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd="/")
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, name
