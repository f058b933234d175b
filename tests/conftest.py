"""Fixtures of the end-to-end tests: a real Stack per test module.

A module tunes its stack with module-level constants:

    FILTER_CONFIG = {...}   merged into the data listener's filter JSON
    ENVOY_ENV = {...}       Envoy's extra environment
    LOG_LEVELS = {...}      {"envoy": "debug", "companion": "debug", "webdis": 8}
    PARTS = (...)           the parts to run (default: all; one L2 front of them)
    L2 = "webdis"           the L2 front (default "rest": the REST front, dialect
                            "upstash", or IBEX_TEST_L2); tests name it generically,
                            stack.l2_part

IBEX_TEST_L2=webdis runs every module that sets no L2 of its own on Webdis.
    DEBUG_HEADERS = False   the committed configs' debug_headers (default True: the
                            upstream gets x-ibex-directive, which helpers.tier reads)
    REDIS = "cluster"       a real three-master Redis Cluster instead of one server
                            (default "single"; needs the REST front)

Every stack has its own random control token (stack.control_token), which its
subscriber presents; stack.control_headers() authorises a test's own POSTs.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stack import Stack  # noqa: E402
from stack.contract import AGENT_KEY_FLUSH_MARKER_PATTERN, FLUSH_MARKER_PATTERN  # noqa: E402
from stack.stack import ORDER  # noqa: E402

_STACK_DIRS = {}


def default_l2():
    """The L2 front of a test stack whose module names none: IBEX_TEST_L2, else the REST front."""
    return os.environ.get("IBEX_TEST_L2") or "rest"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    """Every real process, on free ports, in a temporary directory of the module.

    `patient`: callout timeouts that hold on a loaded machine (stack/envoy.py
    PATIENT_FILTER_CONFIG); a module's FILTER_CONFIG, or a test's
    restart_envoy(filter_config=...), sets its own over them."""
    module = request.module
    name = module.__name__.rsplit(".", 1)[-1]
    directory = tmp_path_factory.mktemp(name)
    _STACK_DIRS[module.__name__] = directory
    with Stack(
        directory,
        filter_config=getattr(module, "FILTER_CONFIG", {}),
        envoy_env=getattr(module, "ENVOY_ENV", {}),
        log_levels=getattr(module, "LOG_LEVELS", None),
        parts=getattr(module, "PARTS", ORDER),
        l2=getattr(module, "L2", default_l2()),
        patient=True,
        debug_headers=getattr(module, "DEBUG_HEADERS", True),
        redis=getattr(module, "REDIS", "single"),
    ) as running:
        yield running


@pytest.fixture(autouse=True)
def no_flush_marker(request):
    """Drop the subscriber's flush markers before each test that has a stack.

    After a full flush (the subscriber does one each time it connects, and
    test_flush publishes one) the companion keeps a flush marker in every hash slot
    (FLUSH_MARKER_PATTERN, and AGENT_KEY_FLUSH_MARKER_PATTERN for gateway keys) for
    10 s, and while they exist the filter skips every L2 write-back. The tests
    use brand-new agents that no cache has seen, so the marker guards nothing
    for them; left in place it would make write-back checks wait out a timer.
    test_invalidation checks the marker's effect itself.
    """
    if "stack" in request.fixturenames:
        redis = request.getfixturevalue("stack").redis
        for pattern in (FLUSH_MARKER_PATTERN, AGENT_KEY_FLUSH_MARKER_PATTERN):
            redis.delete_matching(pattern)


@pytest.fixture()
def upstream(stack):
    """The echo upstream, emptied before the test."""
    stack.upstream.clear()
    return stack.upstream


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, say where the module's stack logs are."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        directory = _STACK_DIRS.get(item.module.__name__)
        if directory:
            report.sections.append(("stack logs", f"{directory} (every *.log below it)"))
