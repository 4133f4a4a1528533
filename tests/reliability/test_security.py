"""Security: keys enforced on every route (constant-time compare), admin-only writes, refusal to bind
off loopback without a key, size limits, safetensors-only checkpoints confined to the registry, and
bad service configs ending in one line that names the field."""

from __future__ import annotations

import ast
import concurrent.futures as cf
import hmac
import inspect
import json
from pathlib import Path

import httpx
import pytest

import rm_service.api as api_module
from rm_core.registry import Registry, RegistryError
from rm_service.app import create_app
from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread
from tests.reliability.helpers import assert_error_body, record, run_cli_no_bind

OPEN = {"/healthz", "/readyz"}  # health stays open for orchestrators
ADMIN = {("PUT", "/v1/principle-sets/{name}"), ("DELETE", "/v1/principle-sets/{name}"), ("POST", "/v1/admin/reload")}
USER, ADMIN_KEY = "user-key-0123456789", "admin-key-9876543210"
SET_BODY = {"principles": [{"name": "a", "definition": "The response is kind."}]}


def _routes():
    """Every operation the app serves, from its spec (each of our routes is in the spec)."""
    spec = create_app(ServiceSettings(scorer="rule")).openapi()
    return sorted((m.upper(), path) for path, ops in spec["paths"].items() for m in ops)


ROUTES = _routes()


@pytest.fixture(scope="module")
def keyed(monkeypatch_module):
    monkeypatch_module.setenv("SALMON_API_KEY", USER)
    monkeypatch_module.setenv("SALMON_ADMIN_KEY", ADMIN_KEY)
    with ServerThread(ServiceSettings(port=0, scorer="rule")) as srv:
        yield srv


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _call(srv, method, path, key=None):
    url = srv.url + path.replace("{name}", "sec-test")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = SET_BODY if method == "PUT" else {"items": [{"prompt": "x", "response": "y"}]} if method == "POST" else None
    return httpx.request(method, url, json=body, headers=headers, timeout=30)


@pytest.mark.parametrize("method, path", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_route_enforces_its_key(keyed, method, path):
    """Enumerated from the app, so a new route is covered (or this test fails) automatically."""
    if path in OPEN:
        assert _call(keyed, method, path).status_code == 200
        return
    for key, expect in ((None, 401), ("wrong", 401), (USER[:-1], 401), (USER + "x", 401)):
        r = _call(keyed, method, path, key)
        assert r.status_code == expect, (key, r.text)
        assert_error_body(r)
        assert r.headers.get("www-authenticate") == "Bearer"
    user = _call(keyed, method, path, USER)
    admin = _call(keyed, method, path, ADMIN_KEY)
    if (method, path) in ADMIN:
        assert user.status_code == 403 and "admin key" in user.json()["error"]["message"]
        assert admin.status_code not in (401, 403), admin.text
        assert_error_body(admin, (method, path))  # past auth: a real answer, never a 500
    else:
        assert user.status_code not in (401, 403), user.text
        assert admin.status_code not in (401, 403), admin.text  # the admin key is a superset
        assert_error_body(user, (method, path))  # past auth: a real answer, never a 500
        assert_error_body(admin, (method, path))


def test_keys_are_compared_in_constant_time(keyed, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(api_module.hmac, "compare_digest", spy)
    assert _call(keyed, "POST", "/v1/score", "wrong").status_code == 401
    assert _call(keyed, "POST", "/v1/score", USER).status_code == 200
    assert _call(keyed, "POST", "/v1/admin/reload", USER).status_code == 403
    assert len(calls) >= 3
    # And no secret is ever compared with == / != anywhere in the auth code.
    tree = ast.parse(inspect.getsource(api_module))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            text = ast.unparse(node)
            assert "secret" not in text and "key" not in text.lower(), f"non-constant-time compare: {text}"


def test_refuses_to_bind_off_loopback_without_a_key_and_binds_nothing():
    """`salmon serve --host 0.0.0.0` exits non-zero with one line, before anything is bound. The CLI
    runs with socket.bind replaced by an immediate exit(99), so no non-loopback address is ever bound."""
    r = run_cli_no_bind(["serve", "--host", "0.0.0.0", "--scorer", "rule"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "refusing to bind 0.0.0.0" in lines[0] and "SALMON_API_KEY" in lines[0] and "--insecure" in lines[0]
    assert "BIND ATTEMPTED" not in r.stderr
    for host in ("::", "10.0.0.1", "example.org"):
        r = run_cli_no_bind(["serve", "--host", host, "--scorer", "rule"])
        assert r.returncode == 2 and "refusing to bind" in r.stderr and "BIND ATTEMPTED" not in r.stderr
    # With --insecure, or with an API key, it goes on to bind: the stub stops it at that exact point.
    r = run_cli_no_bind(["serve", "--host", "0.0.0.0", "--scorer", "rule", "--insecure", "--log-level", "error"])
    assert r.returncode == 99 and "BIND ATTEMPTED ('0.0.0.0'" in r.stderr, r.stderr[-500:]
    r = run_cli_no_bind(["serve", "--host", "0.0.0.0", "--scorer", "rule", "--log-level", "error"],
                        env={"SALMON_API_KEY": USER})
    assert r.returncode == 99 and "BIND ATTEMPTED ('0.0.0.0'" in r.stderr, r.stderr[-500:]
    with pytest.raises(ValueError):
        ServerThread(ServiceSettings(port=0, host="0.0.0.0", scorer="rule"))


BAD_CONFIGS = {
    "unknown field": ("portt: 1\n", "field 'portt'"),
    "wrong type": ("port: abc\n", "field 'port'"),
    "out of range": ("max_items: 0\n", "field 'max_items'"),
    "bad choice": ("scorer: magic\n", "field 'scorer'"),
    "trained without registry": ("scorer: trained\n", "registry"),
    "yaml syntax": ("port: [1\n", "invalid YAML at line"),
    "not a mapping (list)": ("- a\n- b\n", "expected a mapping"),
    "not a mapping (scalar)": ("42\n", "expected a mapping"),
    "not UTF-8": (b"\xff\xfe\x00", "not UTF-8"),
    "missing file": (None, "file not found"),
    "broken set in principle_sets_dir": ("principle_sets_dir: {sets}\n", "field 'principle_sets_dir'"),
    "principle_sets_dir not a directory": ("principle_sets_dir: /nonexistent/sets\n", "field 'principle_sets_dir'"),
    "unknown default set": ("default_principle_set: no-such-set\n", "field 'default_principle_set'"),
    "default set file is bad YAML": ("default_principle_set: {sets}/bad.yaml\n", "field 'default_principle_set'"),
}


@pytest.mark.slow
def test_bad_service_configs_fail_in_one_line_naming_the_field(tmp_path):
    """`salmon serve --config bad.yaml` as a subprocess (bind stubbed): exit 2, one line, the field named."""
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "bad.yaml").write_text("name: x\nprinciples: [\n")

    def run(name: str) -> tuple[str, str, object]:
        text, expect = BAD_CONFIGS[name]
        cfg = tmp_path / f"{name.replace(' ', '_')}.yaml"
        if isinstance(text, bytes):
            cfg.write_bytes(text)
        elif text is not None:
            cfg.write_text(text.format(sets=sets))
        # --scorer rule keeps a config that would load a model quick; configs under test set their own.
        extra = [] if "scorer" in str(text) else ["--scorer", "rule"]
        return name, expect, run_cli_no_bind(["serve", "--config", str(cfg), *extra])

    with cf.ThreadPoolExecutor(2) as pool:  # independent subprocesses: two at a time
        results = list(pool.map(run, BAD_CONFIGS))
    for name, expect, r in results:
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (name, r.returncode, r.stderr[-800:])
        assert len(lines) == 1 and lines[0].startswith("salmon serve: error: ") and expect in lines[0], (name, lines)
        assert "Traceback" not in r.stderr and "BIND ATTEMPTED" not in r.stderr
    tried = len(results)
    record("bad service configs (salmon serve --config, subprocess)", configs_tried=tried, one_line_errors=tried)


def test_size_limits(keyed):
    auth = {"Authorization": f"Bearer {USER}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    item = [{"prompt": "x", "response": "y"}]
    r = httpx.post(keyed.url + "/v1/score", json={"items": item, "principles": ["Be kind."] * 33}, headers=auth)
    assert r.status_code == 413 and "limit is 32" in r.json()["error"]["message"]
    r = httpx.post(keyed.url + "/v1/score", json={"items": item, "principles": ["x" * 2001]}, headers=auth)
    assert r.status_code == 422 and "2000" in r.json()["error"]["message"]
    many = {"principles": [{"name": f"p{i}", "definition": "Be kind."} for i in range(65)]}
    r = httpx.put(keyed.url + "/v1/principle-sets/many", json=many, headers=admin)
    assert r.status_code == 422 and "at most 64" in r.json()["error"]["message"]
    r = httpx.post(keyed.url + "/v1/score", json={"items": item * 257}, headers=auth)
    assert r.status_code == 413 and "limit is 256" in r.json()["error"]["message"]
    # The body limit is checked before authentication costs anything, and before a key is known.
    r = httpx.post(keyed.url + "/v1/score", content=b"x" * (8 * 2**20 + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413


def _dummy_version(root: Path, name: str = "v0001", **manifest) -> Path:
    vdir = root / name
    (vdir / "adapter").mkdir(parents=True)
    w = vdir / "adapter" / "adapter_model.safetensors"
    w.write_bytes(b"weights")
    import hashlib

    m = {"version": name, "base_model": "none", "prompt_format_version": "x",
         "files": {"adapter/adapter_model.safetensors": hashlib.sha256(b"weights").hexdigest()}, **manifest}
    (vdir / "manifest.json").write_text(json.dumps(m))
    return vdir


def test_checkpoints_are_safetensors_only_and_paths_stay_in_the_registry(tmp_path):
    root = tmp_path / "registry"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_model.safetensors").write_bytes(b"weights")
    reg = Registry(root)
    vdir = _dummy_version(root)
    assert reg.manifest("v0001").version == "v0001"
    cases = 0
    for suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle"):
        f = vdir / "adapter" / f"adapter_model{suffix}"
        f.write_bytes(b"pickle")
        with pytest.raises(RegistryError, match="safetensors only"):
            reg.manifest("v0001")
        f.unlink()
        cases += 1
    for bad in ("../outside", "/etc", "adapter/../../outside", "."):  # found by this suite: was not checked
        _dummy_version(root, f"v000{cases}", adapter=bad)
        with pytest.raises(RegistryError, match="outside the version directory"):
            reg.manifest(f"v000{cases}")
        cases += 1
    m = json.loads((vdir / "manifest.json").read_text())
    m["files"]["../../outside/adapter_model.safetensors"] = m["files"].pop("adapter/adapter_model.safetensors")
    (vdir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RegistryError, match="outside the version directory"):
        reg.manifest("v0001")
    v2 = _dummy_version(root, "v0020")  # a symlinked adapter that leads out of the registry
    (v2 / "adapter" / "adapter_model.safetensors").unlink()
    (v2 / "adapter").rmdir()
    (v2 / "adapter").symlink_to(outside)
    with pytest.raises(RegistryError, match="outside the version directory"):
        reg.manifest("v0020")
    for name in ("../v0001", "v0001/../../x", "/abs", "v1", "CURRENT", "v0001\x00"):
        with pytest.raises(RegistryError):
            reg.path(name)
        cases += 1
    record("checkpoint confinement", refused_cases=cases + 2)


def test_reload_endpoint_refuses_paths_out_of_the_registry(tmp_path, monkeypatch):
    root = tmp_path / "registry"
    _dummy_version(root)
    monkeypatch.setenv("SALMON_ADMIN_KEY", ADMIN_KEY)
    with ServerThread(ServiceSettings(port=0, scorer="rule", registry=root)) as srv:
        for v in ("../../etc", "/etc/passwd", "v0001/../..", "..%2f.."):
            r = httpx.post(srv.url + "/v1/admin/reload", json={"version": v},
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
            assert r.status_code == 200 and not r.json()["reloaded"], r.text
            assert "not a version name" in r.json()["message"]
            assert r.json()["model_version"].startswith("rule:")


def test_loopback_check_is_not_fooled():
    """Found by this suite: any host starting with '127.' counted as loopback, so a DNS name such as
    127.0.0.1.example.org (which may resolve anywhere) bypassed the key requirement."""
    for host, loop in (("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
                       ("0.0.0.0", False), ("::", False), ("127.0.0.1.example.org", False), ("127.evil", False),
                       ("::ffff:10.0.0.1", False), ("", False)):
        assert ServiceSettings(host=host).is_loopback is loop, host
    r = run_cli_no_bind(["serve", "--host", "127.0.0.1.example.org", "--scorer", "rule"])
    assert r.returncode == 2 and "refusing to bind" in r.stderr and "BIND ATTEMPTED" not in r.stderr
