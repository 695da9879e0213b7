"""`switchboard-server serve ...`: parse flags into a ServerConfig, configure logging, serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from common import threads
from server.config import DEVICES, QUANTIZATIONS, TRUNCATION_STRATEGIES, ServerConfig

DEFAULTS = ServerConfig(base="-", adapters_root=Path("."))
API_KEYS_ENV = "SWITCHBOARD_API_KEYS"
ADMIN_KEYS_ENV = "SWITCHBOARD_ADMIN_KEYS"


def env_keys(env_value: str | None) -> tuple[str, ...]:
    """Keys from a comma-separated variable (the key files are read by server/keys.py, at start
    and on every SIGHUP)."""
    return tuple(dict.fromkeys(k.strip() for k in (env_value or "").split(",") if k.strip()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` flags; shared with `switchboard serve`, which execs this CLI."""
    d = DEFAULTS
    parser.add_argument("--base", required=True, help="base model directory or hub id")
    parser.add_argument("--adapters-root", required=True, type=Path,
                        help="directory holding <name>/<version>/ adapters and aliases.json")
    parser.add_argument("--host", default=d.host, help=f"address to bind (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port,
                        help=f"port to bind, 0 picks a free one (default {d.port})")
    parser.add_argument("--device", choices=DEVICES, default=d.device)
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=d.quantize,
                        help="the base's weights: nf4 (4-bit, default) or none (bf16 on a GPU, "
                             "float32 on the CPU; faster there for small bases)")
    parser.add_argument("--max-batch", type=int, default=d.max_batch,
                        help="rows decoded together in one step")
    parser.add_argument("--max-loaded-adapters", type=int, default=d.max_loaded_adapters,
                        help="adapters kept in memory; least recently used unpinned ones go first")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="waiting requests before RESOURCE_EXHAUSTED")
    parser.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank)
    parser.add_argument("--context-length", type=int, default=d.context_length,
                        help="prompt + answer token limit; 0 = the model's own. The KV cache "
                             "holds max-batch x this many tokens, allocated at start")
    parser.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens,
                        help="prompt tokens one engine step may prefill (at least one request)")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=d.prefill_chunk_tokens,
                        help="longest prefill forward; longer prompts run in chunks")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                        default=d.cuda_graphs,
                        help="replay decode steps as CUDA graphs (default: on for CUDA only)")
    parser.add_argument("--default-max-new-tokens", type=int, default=d.default_max_new_tokens)
    parser.add_argument("--max-new-tokens-limit", type=int, default=d.max_new_tokens_limit,
                        help="largest max_new_tokens a request may ask for")
    parser.add_argument("--default-truncation", choices=TRUNCATION_STRATEGIES,
                        default=d.default_truncation)
    parser.add_argument("--summarize-adapter", default=d.summarize_adapter,
                        help="adapter writing summaries for the summarize strategy ('' = base)")
    parser.add_argument("--sessions-db", type=Path, default=Path("switchboard-sessions.db"),
                        help="SQLite file for server-side sessions")
    parser.add_argument("--sessions", metavar="URL", default="",
                        help="session store: a SQLite path, sqlite:PATH or redis://HOST:PORT/DB "
                             "(replicas share a Redis); replaces --sessions-db")
    parser.add_argument("--session-lease-seconds", type=float, default=d.session_lease_seconds,
                        help="Redis store: how long a dead replica's hold on a session lasts")
    parser.add_argument("--no-sessions", action="store_true", help="disable server-side sessions")
    parser.add_argument("--session-ttl-seconds", type=float, default=d.session_ttl_seconds)
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions)
    parser.add_argument("--metrics-port", type=int, default=d.metrics_port,
                        help="Prometheus /metrics port; 0 = off")
    parser.add_argument("--metrics-host", default=d.metrics_host)
    parser.add_argument("--http-port", type=int, default=d.http_port,
                        help="OpenAI-compatible HTTP port (POST /v1/chat/completions, "
                             "GET /v1/models) on --host; 0 = off (default)")
    parser.add_argument("--shutdown-grace-seconds", type=float, default=d.shutdown_grace_seconds)
    security = parser.add_argument_group(
        "security", f"API keys come from --api-keys-file / --admin-keys-file (one key per line, "
        f"'#' comments) or ${API_KEYS_ENV} / ${ADMIN_KEYS_ENV} (comma-separated); any key "
        "turns authentication on")
    security.add_argument("--api-keys-file", type=Path, help="keys allowed to chat and score")
    security.add_argument("--admin-keys-file", type=Path,
                          help="keys allowed to administer adapters, aliases and sessions "
                               "(and to chat)")
    security.add_argument("--keys-file", type=Path,
                          help="TOML tenants file: [[keys]] with name, key (or sha256), kind, "
                               "adapters (scope) and limits (see README, Security)")
    security.add_argument("--audit-log", type=Path,
                          help="append-only JSON lines of admin actions (switchboard audit FILE)")
    security.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    security.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    security.add_argument("--tls-client-ca", type=Path,
                          help="CA (PEM) that client certificates must chain to: mutual TLS")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes)
    limits.add_argument("--max-messages", type=int, default=d.max_messages,
                        help="messages per request")
    limits.add_argument("--max-message-chars", type=int, default=d.max_message_chars,
                        help="characters per message")
    limits.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                        help="prompt token budget; 0 = context length - max_new_tokens")
    limits.add_argument("--max-concurrent-requests", type=int,
                        default=d.max_concurrent_requests, help="running + waiting, in total")
    limits.add_argument("--max-concurrent-per-adapter", type=int,
                        default=d.max_concurrent_per_adapter)
    limits.add_argument("--max-adapter-bytes", type=int, default=d.max_adapter_bytes,
                        help="largest adapter weights file the server reads")
    limits.add_argument("--adapter-memory-budget-bytes", type=int,
                        default=d.adapter_memory_budget_bytes,
                        help="memory all loaded adapters may take; 0 = no budget")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines")
    parser.add_argument("--log-level", default="INFO")
    threads.add_arguments(parser)


def config_from_args(args: argparse.Namespace,
                     environ: Mapping[str, str] | None = None) -> ServerConfig:
    """The one place the server reads its environment (the key variables)."""
    environ = os.environ if environ is None else environ
    api_keys = env_keys(environ.get(API_KEYS_ENV))
    admin_keys = env_keys(environ.get(ADMIN_KEYS_ENV))
    config = ServerConfig(
        base=args.base, adapters_root=args.adapters_root, host=args.host, port=args.port,
        device=args.device, quantize=args.quantize, max_batch=args.max_batch,
        max_loaded_adapters=args.max_loaded_adapters, max_queue=args.max_queue,
        max_lora_rank=args.max_lora_rank, context_length=args.context_length,
        max_prefill_tokens=args.max_prefill_tokens,
        prefill_chunk_tokens=args.prefill_chunk_tokens, cuda_graphs=args.cuda_graphs,
        default_max_new_tokens=args.default_max_new_tokens,
        max_new_tokens_limit=args.max_new_tokens_limit,
        default_truncation=args.default_truncation,
        sessions_db=None if args.no_sessions else args.sessions_db,
        sessions_url="" if args.no_sessions else args.sessions,
        session_lease_seconds=args.session_lease_seconds,
        session_ttl_seconds=args.session_ttl_seconds, max_sessions=args.max_sessions,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host, log_json=args.log_json,
        http_port=args.http_port,
        summarize_adapter=args.summarize_adapter,
        shutdown_grace_seconds=args.shutdown_grace_seconds,
        api_keys=api_keys, admin_keys=admin_keys, api_keys_file=args.api_keys_file,
        admin_keys_file=args.admin_keys_file, keys_file=args.keys_file,
        audit_log=args.audit_log, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        max_request_bytes=args.max_request_bytes, max_messages=args.max_messages,
        max_message_chars=args.max_message_chars, max_prompt_tokens=args.max_prompt_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        max_concurrent_per_adapter=args.max_concurrent_per_adapter,
        max_adapter_bytes=args.max_adapter_bytes,
        adapter_memory_budget_bytes=args.adapter_memory_budget_bytes,
    )
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
