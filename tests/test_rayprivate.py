"""Ray's private API lives in ``unusual/rayprivate.py`` only: the sources use none of it elsewhere,
the installed Ray is one that module was checked against, and each of its functions still reaches
the private API it wraps on that Ray. Static, and none of these tests starts Ray but the last."""

from __future__ import annotations

import ast
import inspect
import os
import re
from pathlib import Path

import pytest

from unusual import rayprivate

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("unusual", "models", "ray_jobs", "serving")
HOME = "unusual/rayprivate.py"


def _private(dotted: str) -> bool:
    """A name under ``ray`` with a private part: ``ray._private``, ``ray.serve._private``, ``ray._raylet``…"""
    parts = dotted.split(".")
    return parts[0] == "ray" and any(p.startswith("_") and not p.endswith("__") for p in parts[1:])


def _dotted(node: ast.AST) -> list[str] | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id, *reversed(names)] if isinstance(node, ast.Name) else None


def private_uses(source: str) -> dict[int, str]:
    """Line -> what of Ray's private API that line uses: imports of private modules or names, attribute
    access through a public name bound to Ray (``ray._private.worker``, ``serve._private``; a name imported
    from a private module counts once, at its import), and keywords that start with ``_``
    (``options(_internal=True)``, ``ray.init(_temp_dir=...)``)."""
    tree = ast.parse(source)
    bound = {}  # local name -> the Ray name it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "ray":
                    bound[a.asname or "ray"] = a.name if a.asname else "ray"
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "ray":
            for a in node.names:
                bound[a.asname or a.name] = f"{node.module}.{a.name}"
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if _private(a.name)]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names if _private(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute) and (chain := _dotted(node)) and chain[0] in bound:
            name = ".".join([bound[chain[0]], *chain[1:]])  # a name from a private module: counted at its import
            names = [name] if _private(name) and not _private(bound[chain[0]]) else []
        elif isinstance(node, ast.Call):
            names = [f"{k.arg}=" for k in node.keywords if k.arg and k.arg.startswith("_") and not k.arg.endswith("__")]
        else:
            continue
        if names:
            found[node.lineno] = found.get(node.lineno, names[0])
    return found


def test_the_scan_finds_each_kind_of_private_use():
    source = (
        "import ray\n"
        "from ray._private import worker\n"  # 2
        "from ray.serve._private.constants import SERVE_NAMESPACE\n"  # 3
        "import ray.air._internal.filelock as fl\n"  # 4
        "from ray import _raylet\n"  # 5
        "port = ray._private.worker.global_worker.node.metrics_export_port\n"  # 6
        "from ray import serve\n"
        "x = serve._private.constants\n"  # 8
        "d = serve.deployment(f).options(version='1', _internal=True)\n"  # 9
        "ray.init(_temp_dir='/tmp/r')\n"  # 10
        "print(ray.__version__, ray.data.read_parquet, serve.run, os._exit, self._private)\n"  # public, or not Ray
        "n = worker.global_worker.node; fl.TempFileLock\n"  # counted once, at their imports (lines 2 and 4)
    )
    assert sorted(private_uses(source)) == [2, 3, 4, 5, 6, 8, 9, 10]


def test_only_rayprivate_uses_rays_private_api():
    """Any other module that needs Ray's private API gets a function in unusual/rayprivate.py (with its
    fallback for a Ray where the API moved, and a test here that it still reaches it)."""
    found: dict[str, list[str]] = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel != HOME:
                uses = private_uses(path.read_text())
                if uses:
                    found[rel] = [f"{rel}:{line}: {what}" for line, what in sorted(uses.items())]
    unexpected = [u for uses in found.values() for u in uses]
    assert not unexpected, "Ray's private API outside unusual/rayprivate.py (wrap it there):\n" + "\n".join(unexpected)


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def test_the_installed_ray_is_one_rayprivate_was_checked_against():
    import ray

    assert _minor(ray.__version__) in rayprivate.SUPPORTED_RAY, (
        f"Ray {ray.__version__} is not in unusual.rayprivate.SUPPORTED_RAY {rayprivate.SUPPORTED_RAY}: re-check "
        "each function of unusual/rayprivate.py against this Ray's sources (the private API its docstring names, "
        f"and what its fallback does where that moved; the tests below), then add {_minor(ray.__version__)!r}"
    )


def test_the_oldest_ray_pyproject_allows_is_supported():
    pin = re.search(r'"ray\[[^\]]*\]>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and _minor(pin.group(1)) in rayprivate.SUPPORTED_RAY, (pin and pin.group(1), rayprivate.SUPPORTED_RAY)


# --------------------------------------------------------------------------- each wrapper reaches its API


def test_replace_worker_output_handler(monkeypatch):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    monkeypatch.setattr(dispatcher, "handlers", list(dispatcher.handlers))  # restored afterwards
    dispatcher.add_handler("unusual-test", print)
    ours = lambda data: None  # noqa: E731
    assert rayprivate.replace_worker_output_handler("unusual-test", ours)
    assert ("unusual-test", ours) in dispatcher.handlers and ("unusual-test", print) not in dispatcher.handlers
    assert not rayprivate.replace_worker_output_handler("unusual-no-such-handler", ours)


def test_filter_driver_messages(monkeypatch):
    from ray._private import worker

    assert list(inspect.signature(worker.print_to_stdstream).parameters) == ["data", "ignore_prefix"]
    printed = []
    monkeypatch.setattr(worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data["lines"]))
    drop = lambda data: None if "drop" in data["lines"] else {**data, "lines": data["lines"] + ["!"]}  # noqa: E731
    assert rayprivate.filter_driver_messages(drop)
    wrapped = worker.print_to_stdstream
    assert rayprivate.filter_driver_messages(drop) and worker.print_to_stdstream is wrapped  # installed once
    worker.print_to_stdstream({"lines": ["a"]}, ignore_prefix=False)
    worker.print_to_stdstream({"lines": ["drop"]}, ignore_prefix=False)
    assert printed == [["a", "!"]]


def test_temp_lock_path_is_the_file_ray_locks(tmp_path):
    from ray.air._internal.filelock import TempFileLock

    target = str(tmp_path / "download")
    lock = rayprivate.temp_lock_path(target)
    assert lock and os.path.basename(os.path.dirname(lock)) == "_ray_lockfiles", lock
    try:
        with TempFileLock(target):
            assert os.path.exists(lock)
    finally:
        if os.path.exists(lock):
            os.remove(lock)


def test_haproxy_binary():
    from ray.serve._private.haproxy import _resolve_haproxy_binary

    try:
        expected = _resolve_haproxy_binary()
    except FileNotFoundError:
        expected = None
    assert rayprivate.haproxy_binary() == expected


def test_serve_http_port_reaches_the_controller_api():
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    from ray.serve._private.controller import ServeController
    from ray.serve.config import HTTPOptions

    assert (SERVE_CONTROLLER_NAME, SERVE_NAMESPACE) == rayprivate._SERVE_CONTROLLER  # the fallback is right
    assert callable(ServeController.get_http_config)
    assert "port" in HTTPOptions.model_fields


def test_kill_local_ray_kills_only_a_head_node(monkeypatch):
    from ray._private import worker
    from ray._private.node import Node

    assert {"check_alive", "allow_graceful", "wait"} <= set(inspect.signature(Node.kill_all_processes).parameters)
    assert "self.head = " in inspect.getsource(Node.__init__)

    class FakeNode:
        def __init__(self, head):
            self.head, self.calls = head, []

        def kill_all_processes(self, **kwargs):
            self.calls.append(kwargs)

    for head in (True, False):
        node = FakeNode(head)
        monkeypatch.setattr(worker, "_global_node", node)  # raising=True: the attribute must exist
        rayprivate.kill_local_ray()
        assert node.calls == ([{"check_alive": False, "allow_graceful": False, "wait": True}] if head else [])
    monkeypatch.setattr(worker, "_global_node", None)
    rayprivate.kill_local_ray()  # no Ray started here: nothing to do


def test_with_version():
    from ray import serve

    @serve.deployment
    class Model:
        pass

    assert rayprivate.with_version(Model, "abc123").version == "abc123"

    class Refuses:
        def options(self, **kwargs):
            raise ValueError("`version` in `Deployment.options()` has been removed")

    refuses = Refuses()
    assert rayprivate.with_version(refuses, "abc123") is refuses


def test_new_request_id_gives_the_task_its_own_id():
    import asyncio

    from ray.serve import context

    async def main():
        context._set_request_context(route="/x", request_id="r1", _internal_request_id="shared")

        async def one():
            assert rayprivate.new_request_id()
            return context._get_serve_request_context()

        a, b = await asyncio.gather(one(), one())
        ids = {a._internal_request_id, b._internal_request_id}
        assert len(ids) == 2 and "shared" not in ids and a.request_id == b.request_id == "r1"
        assert context._get_serve_request_context()._internal_request_id == "shared"  # the request's own

    asyncio.run(main())


@pytest.mark.slow
def test_serve_http_port_on_a_running_ray(ray_cluster):
    """None where no Serve controller runs, else its port: checked against Ray's public list of named actors."""
    import ray.util

    controllers = [a for a in ray.util.list_named_actors(all_namespaces=True)
                   if a == {"name": rayprivate._SERVE_CONTROLLER[0], "namespace": rayprivate._SERVE_CONTROLLER[1]}]
    port = rayprivate.serve_http_port()
    assert (port is None) == (not controllers) and (port is None or port > 0), (port, controllers)
