"""`switchboard-server serve ...`: parse flags into a ServerConfig, configure logging, serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping

from common import settings, threads
from server.config import SECURITY, SESSIONS, ServerConfig

API_KEYS_ENV = "SWITCHBOARD_API_KEYS"
ADMIN_KEYS_ENV = "SWITCHBOARD_ADMIN_KEYS"
GROUP_NOTES = {
    SECURITY: f"API keys come from --api-keys-file / --admin-keys-file (one key per line, '#' "
              f"comments) or ${API_KEYS_ENV} / ${ADMIN_KEYS_ENV} (comma-separated); any key "
              "turns authentication on",
    SESSIONS: "server-side conversations, kept under a session id",
}


def env_keys(env_value: str | None) -> tuple[str, ...]:
    """Keys from a comma-separated variable (the key files are read by server/keys.py, at start
    and on every SIGHUP)."""
    return tuple(dict.fromkeys(k.strip() for k in (env_value or "").split(",") if k.strip()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` flags, one per ServerConfig setting, grouped by section; shared with
    `switchboard serve`, which execs this CLI."""
    settings.add_flags(parser, ServerConfig, GROUP_NOTES)
    parser.add_argument("--no-sessions", action="store_true",
                        help="disable server-side sessions (overrides --sessions-db/--sessions)")
    parser.add_argument("--log-level", default="INFO",
                        help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    threads.add_arguments(parser)


def config_from_args(args: argparse.Namespace,
                     environ: Mapping[str, str] | None = None) -> ServerConfig:
    """The one place the server reads its environment (the key variables)."""
    environ = os.environ if environ is None else environ
    values = settings.values_from(args, ServerConfig)
    if args.no_sessions:
        values.update(sessions_db=None, sessions_url="")
    config = ServerConfig.build(**values, api_keys=env_keys(environ.get(API_KEYS_ENV)),
                                admin_keys=env_keys(environ.get(ADMIN_KEYS_ENV)))
    config.key_sources.load()  # a bad keys file stops the start here, before the model loads
    return config


def run(args: argparse.Namespace) -> int:
    # Threads before anything loads torch (server.app does): libgomp reads its wait policy once.
    try:
        thread_report = threads.apply(threads.config_from_args(args))
    except ValueError as e:
        print(f"switchboard-server: {e}", file=sys.stderr)
        return 2
    from server.app import serve_forever
    from server.logging_setup import configure_logging

    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"switchboard-server: {e}", file=sys.stderr)
        return 2
    configure_logging(args.log_level.upper(), json_lines=config.log_json)
    logging.getLogger("server").info(thread_report.describe())
    try:
        serve_forever(config)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:
        # A setting that only fails once used (an unreadable PEM file): one line, no traceback.
        logging.getLogger("server").debug("start failed", exc_info=True)
        print(f"switchboard-server: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        logging.getLogger("server").exception("server failed: %s", e)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard-server",
                                     description="Switchboard multi-LoRA gRPC inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a base model and its adapters over gRPC")
    add_arguments(serve)
    serve.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
