"""The test plug-in `dialgate-echo` (a distribution of its own, beside this
file): installed for real into a directory of its own, or loaded from its
source for tests that run in-process."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).resolve().parent / "dialgate-echo"


def install(into: Path) -> Path:
    """`pip install` the distribution into `into/site` (built from a copy:
    the source tree stays clean); the directory to put on PYTHONPATH."""
    build = into / "src"
    shutil.copytree(SOURCE, build)
    target = into / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(build)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return target


def module() -> ModuleType:
    """The plug-in's module, loaded from its source without touching
    sys.path (so the process's own entry-point discovery never sees it)."""
    name = "dialgate_echo_inprocess"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SOURCE / "dialgate_echo" / "__init__.py")
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    return loaded
