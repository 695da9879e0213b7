"""Choosing the session store by URL (`--sessions`): what each form means, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import build_parser, config_from_args
from server.config import ServerConfig
from server.session_stores import parse_sessions_url


@pytest.mark.parametrize(("value", "path"), [
    ("sessions.db", "sessions.db"),
    ("/var/lib/sb/sessions.db", "/var/lib/sb/sessions.db"),
    ("sqlite:///var/lib/sb/sessions.db", "/var/lib/sb/sessions.db"),
    ("sqlite:relative.db", "relative.db"),
])
def test_a_path_or_sqlite_url_is_the_sqlite_store(value: str, path: str) -> None:
    url = parse_sessions_url(value)
    assert (url.kind, url.sqlite_path) == ("sqlite", Path(path))


def test_a_redis_url_keeps_client_options_and_takes_out_the_prefix() -> None:
    url = parse_sessions_url("redis://:s3cret@cache:6380/2?prefix=team-a:&socket_timeout=2")
    assert (url.kind, url.prefix) == ("redis", "team-a:")
    assert url.redis_url == "redis://:s3cret@cache:6380/2?socket_timeout=2"
    assert url.display == "redis://cache:6380/2"  # never the password
    assert parse_sessions_url("rediss://cache/0").prefix == "switchboard:"
    assert parse_sessions_url("unix:///run/redis.sock").kind == "redis"


@pytest.mark.parametrize(("value", "message"), [
    ("", "got ''"),
    ("postgres://db/sessions", "scheme 'postgres' is not supported"),
    ("redis:///0", "names no host"),
    ("redis://cache:notaport/0", "bad port"),
    ("redis://cache/0?prefix=", "prefix must be non-empty"),
    ("sqlite://", "names no file"),
])
def test_bad_urls_are_refused_saying_what_is_accepted(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sessions_url(value)


def serve_config(*flags: str) -> ServerConfig:
    args = build_parser().parse_args(["serve", "--base", "b", "--adapters-root", "a", *flags])
    return config_from_args(args, environ={})


def test_the_cli_takes_a_url_keeps_sessions_db_and_can_turn_sessions_off() -> None:
    assert serve_config("--sessions", "redis://r:6379/0").sessions_location.kind == "redis"
    legacy = serve_config("--sessions-db", "x.db").sessions_location
    assert (legacy.kind, legacy.sqlite_path) == ("sqlite", Path("x.db"))
    assert serve_config("--sessions", "redis://r/0", "--no-sessions").sessions_location is None
    with pytest.raises(ValueError, match="sessions_url: sessions URL scheme 'mongodb'"):
        serve_config("--sessions", "mongodb://m/0")
    with pytest.raises(ValueError, match="session_lease_seconds must be"):
        serve_config("--session-lease-seconds", "0")
