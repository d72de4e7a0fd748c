"""Render the gateway's nginx.conf from a keys file and a few settings.

    python -m gateway.render --keys gateway/keys --out gateway/nginx.conf

Keys file: one client a line, `name key rate [burst=N] [admin]`, `#` comments; see gateway/keys.example.
  name   lower-case letters, digits, `_`; logged instead of the key
  key    the API key clients send (`x-api-key` header / gRPC metadata): 20-200 of A-Z a-z 0-9 `_` `-`
  rate   nginx limit_req rate for this key, `Nr/s` or `Nr/m`
  burst  requests over the rate accepted at once before 429 / RESOURCE_EXHAUSTED (default --burst)
  admin  this key may call Triton's restricted APIs (model repository, config, statistics, logging, trace,
         shared memory); the gateway adds Triton's admin header for it
Triton's admin secret (the value of its restricted-API header) comes from TRITON_ADMIN_KEY in the environment
or in the .env file that docker compose also reads, so the gateway and Triton agree.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "nginx.conf.template"
ADMIN_HEADER = "admin-key"  # Triton: --http-restricted-api=<apis>:admin-key=<secret>
ADMIN_ENV = "TRITON_ADMIN_KEY"

_NAME = re.compile(r"[a-z0-9_]{1,64}")
# Words with a meaning of their own inside nginx's map blocks: a client called `default` would set the default.
_RESERVED_NAMES = {"default", "hostnames", "include", "volatile"}
# A small alphabet keeps keys and secrets from ever needing quoting or escaping in nginx syntax or regexes.
_KEY = re.compile(r"[A-Za-z0-9_-]{20,200}")
_RATE = re.compile(r"[1-9][0-9]{0,6}r/[sm]")
_SIZE = re.compile(r"[1-9][0-9]*[km]?")
_LISTEN = re.compile(r"(\[[0-9a-fA-F:]+\]:|[A-Za-z0-9.-]+:)?[0-9]{1,5}")
_PATH = re.compile(r"[A-Za-z0-9_./-]+")


class KeysFileError(ValueError):
    """The keys file or a setting is unusable; the message says which line and why."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    key: str
    rate: str
    burst: int | None = None
    admin: bool = False


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway listens, where Triton is, and limits. Defaults fit the compose `gateway` service."""

    admin_secret: str
    http_listen: str = "8000"
    grpc_listen: str = "8001"
    triton_http: str = "triton:8000"
    triton_grpc: str = "triton:8001"
    burst: int = 5
    open_rate: str = "20r/s"
    max_body: str = "64m"
    body_buffer: str = "8m"
    timeout: str = "300s"
    worker_processes: str = "auto"
    user: str | None = "www-data"
    pid: str = "/run/nginx.pid"
    error_log: str = "stderr"
    access_log: str = "/dev/stdout"
    temp_dir: str | None = None  # None: nginx's compiled-in temp paths


def parse_keys(text: str, source: str = "keys file") -> list[ApiKey]:
    keys: list[ApiKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{source}:{number}"
        if len(fields) < 3:
            raise KeysFileError(f"{where}: expected `name key rate [burst=N] [admin]`")
        name, key, rate, *flags = fields
        if not _NAME.fullmatch(name) or name in _RESERVED_NAMES:
            raise KeysFileError(f"{where}: name {name!r} must be 1-64 lower-case letters, digits or _, and not one "
                                f"of {', '.join(sorted(_RESERVED_NAMES))}")
        if key.upper().startswith("CHANGE-ME"):
            raise KeysFileError(f"{where}: {name} still has the example's placeholder key; generate a real one")
        if not _KEY.fullmatch(key):
            raise KeysFileError(f"{where}: the key of {name} must be 20-200 characters of A-Z a-z 0-9 _ -")
        if not _RATE.fullmatch(rate):
            raise KeysFileError(f"{where}: rate {rate!r} must look like 10r/s or 600r/m")
        burst, admin = None, False
        for flag in flags:
            if flag == "admin":
                admin = True
            elif re.fullmatch(r"burst=[0-9]{1,5}", flag):
                burst = int(flag.split("=", 1)[1])
            else:
                raise KeysFileError(f"{where}: unknown field {flag!r} (expected burst=N or admin)")
        keys.append(ApiKey(name, key, rate, burst, admin))
    if not keys:
        raise KeysFileError(f"{source}: no keys; the gateway would refuse every request")
    for attribute in ("name", "key"):
        values = [getattr(entry, attribute) for entry in keys]
        duplicates = sorted({value for value in values if values.count(value) > 1})
        if duplicates:
            shown = duplicates if attribute == "name" else ["(a key is shared by two clients)"]
            raise KeysFileError(f"{source}: duplicate {attribute}s: {', '.join(shown)}")
    return keys


def _check_settings(settings: GatewaySettings) -> None:
    checks = [
        (_KEY, settings.admin_secret, f"{ADMIN_ENV} must be 20-200 characters of A-Z a-z 0-9 _ -"),
        (_LISTEN, settings.http_listen, "http_listen must be PORT or HOST:PORT"),
        (_LISTEN, settings.grpc_listen, "grpc_listen must be PORT or HOST:PORT"),
        (_LISTEN, settings.triton_http, "triton_http must be HOST:PORT"),
        (_LISTEN, settings.triton_grpc, "triton_grpc must be HOST:PORT"),
        (_RATE, settings.open_rate, "open_rate must look like 20r/s"),
        (_SIZE, settings.max_body, "max_body must look like 64m"),
        (_SIZE, settings.body_buffer, "body_buffer must look like 8m"),
        (re.compile(r"[1-9][0-9]*[sm]?"), settings.timeout, "timeout must look like 300s"),
        (re.compile(r"auto|[1-9][0-9]?"), settings.worker_processes, "worker_processes must be auto or N"),
        (_PATH, settings.pid, "pid must be a plain path"),
        (_PATH, settings.error_log, "error_log must be a plain path or stderr"),
        (_PATH, settings.access_log, "access_log must be a plain path"),
    ]
    if settings.user is not None:
        checks.append((re.compile(r"[a-z_][a-z0-9_-]{0,31}"), settings.user, "user must be a plain user name"))
    if settings.temp_dir is not None:
        checks.append((_PATH, settings.temp_dir, "temp_dir must be a plain path"))
    for pattern, value, message in checks:
        if not pattern.fullmatch(value):
            raise KeysFileError(f"{message}, got {value!r}")
    if settings.burst < 0:
        raise KeysFileError("burst must be >= 0")


def render(keys: list[ApiKey], settings: GatewaySettings, template: str | None = None) -> str:
    """The nginx.conf text. Every value is validated first: the output is safe to hand to nginx."""
    _check_settings(settings)
    text = template if template is not None else TEMPLATE.read_text()
    indent = " " * 8
    key_map = "\n".join(f'{indent}"~^{entry.key}$" {entry.name};' for entry in keys)
    admin_map = "\n".join(f"{indent}{entry.name} {settings.admin_secret};" for entry in keys if entry.admin)
    rate_maps = "\n".join(f'    map $api_client $rate_key_{entry.name} {{ default ""; {entry.name} {entry.name}; }}'
                          for entry in keys)
    rate_zones = "\n".join(f"    limit_req_zone $rate_key_{entry.name} zone=key_{entry.name}:1m rate={entry.rate};"
                           for entry in keys)
    limit_req = "\n".join(
        f"{indent}limit_req zone=key_{entry.name} burst={settings.burst if entry.burst is None else entry.burst}"
        " nodelay;" for entry in keys)
    temp_paths = ""
    if settings.temp_dir is not None:
        temp_paths = "\n".join(f"    {kind}_temp_path {settings.temp_dir}/{kind};"
                               for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")) + "\n"
    values = {
        "USER": f"user {settings.user};" if settings.user else "# user: not set (nginx's default)",
        "WORKER_PROCESSES": settings.worker_processes,
        "PID": settings.pid,
        "ERROR_LOG": settings.error_log,
        "ACCESS_LOG": settings.access_log,
        "TEMP_PATHS": temp_paths,
        "KEY_MAP": key_map,
        "ADMIN_MAP": admin_map,
        "RATE_MAPS": rate_maps,
        "RATE_ZONES": rate_zones,
        "LIMIT_REQ": limit_req,
        "OPEN_RATE": settings.open_rate,
        "MAX_BODY": settings.max_body,
        "BODY_BUFFER": settings.body_buffer,
        "TIMEOUT": settings.timeout,
        "HTTP_LISTEN": settings.http_listen,
        "GRPC_LISTEN": settings.grpc_listen,
        "TRITON_HTTP": settings.triton_http,
        "TRITON_GRPC": settings.triton_grpc,
        "ADMIN_HEADER": ADMIN_HEADER,
    }
    rendered = re.sub(r"@@([A-Z_]+)@@", lambda match: values[match[1]], text)
    return rendered


def find_nginx() -> str | None:
    """The nginx binary, or None. Debian installs it in /usr/sbin, which is not on every user's PATH."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)), None)


def admin_secret_from(env_file: Path | None) -> str | None:
    """TRITON_ADMIN_KEY from the environment, else from a `.env` file (KEY=VALUE lines), else None."""
    if os.environ.get(ADMIN_ENV):
        return os.environ[ADMIN_ENV]
    if env_file is not None and env_file.is_file():
        for line in env_file.read_text().splitlines():
            name, sep, value = line.strip().partition("=")
            if sep and name.strip() == ADMIN_ENV:
                return value.strip().strip("'\"")
    return None


def main(argv: list[str] | None = None) -> int:
    defaults = GatewaySettings(admin_secret="")
    parser = argparse.ArgumentParser(prog="python -m gateway.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=Path, default=Path("gateway/keys"), help="keys file (default gateway/keys)")
    parser.add_argument("--out", type=Path, default=Path("gateway/nginx.conf"))
    parser.add_argument("--env-file", type=Path, default=Path(".env"),
                        help=f"where to find {ADMIN_ENV} when it is not in the environment (default .env)")
    for option in ("http_listen", "grpc_listen", "triton_http", "triton_grpc", "open_rate", "max_body", "pid",
                   "error_log", "access_log"):
        parser.add_argument(f"--{option.replace('_', '-')}", default=getattr(defaults, option),
                            help=f"default {getattr(defaults, option)}")
    parser.add_argument("--burst", type=int, default=defaults.burst, help=f"default {defaults.burst}")
    parser.add_argument("--user", default=defaults.user, help="worker user; '' to leave it (default www-data)")
    parser.add_argument("--temp-dir", default=None, help="folder for nginx's temp files (default: compiled-in)")
    args = parser.parse_args(argv)
    secret = admin_secret_from(args.env_file)
    if not secret:
        print(f"error: set {ADMIN_ENV} (docker compose passes the same value to Triton), e.g.\n"
              f"  echo \"{ADMIN_ENV}=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')\" >> .env",
              file=sys.stderr)
        return 1
    try:
        keys = parse_keys(args.keys.read_text(), str(args.keys))
        settings = GatewaySettings(
            admin_secret=secret, http_listen=args.http_listen, grpc_listen=args.grpc_listen,
            triton_http=args.triton_http, triton_grpc=args.triton_grpc, burst=args.burst, open_rate=args.open_rate,
            max_body=args.max_body, pid=args.pid, error_log=args.error_log, access_log=args.access_log,
            user=args.user or None, temp_dir=args.temp_dir)
        text = render(keys, settings)
    except (OSError, KeysFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The output holds every key and Triton's admin secret: owner-only from the start.
    descriptor = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    admins = sum(entry.admin for entry in keys)
    print(f"wrote {args.out}: {len(keys)} key(s), {admins} admin; HTTP {settings.http_listen} -> "
          f"{settings.triton_http}, gRPC {settings.grpc_listen} -> {settings.triton_grpc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
