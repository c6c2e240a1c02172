"""The installed package is complete: every package is listed in ``pyproject.toml``, and a wheel
carries the migrations (the top-level ``migrations/`` folder, mapped to ``service.migrations``)
so that ``nme-service migrate`` works from a wheel and the container, not only from a clone."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from service import migrate

ROOT = Path(__file__).resolve().parents[1]


def declared_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return set(config["tool"]["setuptools"]["packages"])


def test_every_package_is_declared() -> None:
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for folder in ("nme", "service")
        for init in (ROOT / folder).rglob("__init__.py")
    }
    found |= {
        ".".join(("service", *init.parent.relative_to(ROOT).parts))
        for init in (ROOT / "migrations").rglob("__init__.py")
    }
    assert found - declared_packages() == set(), "add these to [tool.setuptools] packages"
    assert declared_packages() - found == set(), "declared packages that do not exist"


@pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None, reason="building a wheel needs setuptools"
)
def test_wheel_migrates_from_its_own_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         str(ROOT), "-w", str(tmp_path / "dist")],
        check=True, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("env.py", "script.py.mako", "versions/0001_initial.py"):
        assert f"service/migrations/{name}" in names
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    database = tmp_path / "wheel.sqlite3"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from service import migrate;"
        "assert str(migrate.MIGRATIONS_DIR).startswith(sys.argv[1]), migrate.MIGRATIONS_DIR;"
        "migrate.upgrade(sys.argv[2]); print(migrate.head_revision())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(unpacked.resolve()), f"sqlite:///{database}"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.stdout.strip() == migrate.head_revision()
    assert database.stat().st_size > 0
