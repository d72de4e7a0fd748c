"""gateway/render.py: the keys file, settings validation, and nginx's verdict on the rendered config (no servers)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from facefuse.local_server import ADMIN_HEADER, RESTRICTED_APIS
from gateway.render import ApiKey, GatewaySettings, KeysFileError, parse_keys, render
from tests.conftest import REPO_ROOT, require_nginx


def test_renderer_and_triton_use_one_admin_header() -> None:
    from gateway import render as render_module

    assert render_module.ADMIN_HEADER == ADMIN_HEADER
    assert set(RESTRICTED_APIS) == {"model-repository", "model-config", "shared-memory", "logging", "trace",
                                    "statistics"}


@pytest.mark.parametrize(("line", "complaint"), [
    ("alice short 10r/s", "20-200 characters"),
    ("alice CHANGE-ME-0123456789abcdefghij 10r/s", "placeholder"),
    ("alice abcdefghij0123456789abcdefghij 10 r/s", "rate"),
    ("alice abcdefghij0123456789abcdefghij fast", "rate"),
    ("al-ice abcdefghij0123456789abcdefghij 10r/s", "name"),
    ("Alice abcdefghij0123456789abcdefghij 10r/s", "name"),
    ("default abcdefghij0123456789abcdefghij 10r/s admin", "name"),  # would make every client an admin
    ('alice abcdefghij0123456789"; evil 10r/s', "20-200 characters"),
    ("alice abcdefghij0123456789abcdefghij 10r/s root", "unknown field"),
])
def test_keys_file_errors(line: str, complaint: str) -> None:
    with pytest.raises(KeysFileError, match=complaint):
        parse_keys(line + "\n")


def test_keys_file_duplicates_and_example() -> None:
    with pytest.raises(KeysFileError, match="duplicate names"):
        parse_keys("a abcdefghij0123456789abcdefghij 1r/s\na abcdefghij0123456789abcdefghik 1r/s\n")
    with pytest.raises(KeysFileError, match="duplicate keys"):
        parse_keys("a abcdefghij0123456789abcdefghij 1r/s\nb abcdefghij0123456789abcdefghij 1r/s\n")
    with pytest.raises(KeysFileError, match="no keys"):
        parse_keys("# nothing\n")
    example = (REPO_ROOT / "gateway" / "keys.example").read_text()
    with pytest.raises(KeysFileError, match="placeholder"):  # the example cannot be deployed by accident
        parse_keys(example)
    parsed = parse_keys(example.replace("CHANGE-ME", "real"))
    assert any(entry.admin for entry in parsed) and not all(entry.admin for entry in parsed)


def test_rendered_config_is_accepted_by_nginx(tmp_path: Path) -> None:
    nginx = require_nginx()
    keys = [ApiKey("alice", "a" * 24, "10r/s"), ApiKey("ops", "b" * 24, "60r/m", burst=1, admin=True)]
    defaults = render(keys, GatewaySettings(admin_secret="s" * 24))
    assert "@@" not in defaults.replace("@@...@@", "")
    assert defaults.count("s" * 24) == 1  # Triton's secret only in the admin map, for `ops`
    assert "listen 8001 http2;" in defaults and "server triton:8001;" in defaults and "8002" not in defaults
    assert "user www-data;" in defaults
    # nginx -t resolves upstream names: point them at this host so the check needs no compose network.
    settings = GatewaySettings(admin_secret="s" * 24, triton_http="127.0.0.1:9", triton_grpc="127.0.0.1:9",
                               user=None, pid=str(tmp_path / "pid"), error_log=str(tmp_path / "error.log"),
                               access_log=str(tmp_path / "access.log"), temp_dir=str(tmp_path))
    (tmp_path / "nginx.conf").write_text(render(keys, settings))
    checked = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    with pytest.raises(KeysFileError):
        render(keys, GatewaySettings(admin_secret="short"))


def test_missing_nginx_fails_unless_explicitly_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(require_nginx.__globals__, "find_nginx", lambda: None)
    monkeypatch.delenv("FACEFUSE_ALLOW_NO_NGINX", raising=False)
    with pytest.raises(pytest.fail.Exception, match="apt-get install nginx-light"):
        require_nginx()
    monkeypatch.setenv("FACEFUSE_ALLOW_NO_NGINX", "1")
    with pytest.raises(pytest.skip.Exception, match="FACEFUSE_ALLOW_NO_NGINX=1"):
        require_nginx()
