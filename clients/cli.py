"""The `switchboard` command line: chat, adapter and session admin, health, score, serve.

Only argparse and the standard library load at start; gRPC loads when a command needs it, and the
server package never loads here (`switchboard serve` replaces this process with the server's
own CLI). Failed calls print `error: CODE: details` to stderr and exit with status 1; a call
refused for want of a key (or of an admin key) says so on that line.

The security options (`--api-key`, `--tls`, `--ca-cert`, `--client-cert`, `--client-key`) and the
error line are shared with the `evalsuite` CLI; the key's environment variable is read in `main`.
A call refused by a key's rate limit is retried after the server's `retry-after` (up to three
times, within --timeout), and the error line says the wait. `switchboard audit FILE` prints the
server's audit trail (server/audit.py writes it) without contacting the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from clients.client import SwitchboardClient
    from clients.errors import SwitchboardRpcError
    from clients.types import ChatResult

DEFAULT_TARGET = "127.0.0.1:50051"
API_KEY_ENV = "SWITCHBOARD_API_KEY"
# What a refused call needs, said on the error line (the server's details follow).
AUTH_HINTS = {
    "UNAUTHENTICATED": f"this call needs a key the server knows (--api-key or ${API_KEY_ENV})",
    "PERMISSION_DENIED": "this call needs an admin key",
}
TRUNCATION_CHOICES = ("error", "drop_oldest", "sliding_window", "middle_out", "summarize")
REPL_HELP = "commands: /reset clears the conversation, /quit leaves (so does Ctrl-D)"

Handler = Callable[["SwitchboardClient", argparse.Namespace], int]


# ---------------------------------------------------------------------- security and errors


def add_security_options(parser: argparse.ArgumentParser, *, key_help: str = "") -> None:
    """--api-key, --tls, --ca-cert, --client-cert, --client-key (read by `security_kwargs`)."""
    group = parser.add_argument_group("security")
    group.add_argument("--api-key", default=None, metavar="KEY",
                       help=f"key sent with every call (default: ${API_KEY_ENV}, which keeps it "
                       "out of the process list). " + (key_help or "Chat and score need an API "
                       "key; adapters commands need an admin key; sessions commands show an API "
                       "key its own sessions and an admin key every session."))
    group.add_argument("--tls", action="store_true",
                       help="connect with TLS, trusting the system's CAs (implied by --ca-cert "
                       "and --client-cert)")
    group.add_argument("--ca-cert", default=None, metavar="PEM",
                       help="CA certificate that signed the server's certificate")
    group.add_argument("--client-cert", default=None, metavar="PEM",
                       help="this client's certificate, for a server that requires mutual TLS")
    group.add_argument("--client-key", default=None, metavar="PEM",
                       help="the private key of --client-cert")


def security_kwargs(args: argparse.Namespace, env_api_key: str | None) -> dict[str, Any]:
    """The client's security keywords; `env_api_key` (read by main) stands in for --api-key."""
    api_key = env_api_key if args.api_key is None else args.api_key
    # An empty --api-key '' (or variable) means no key, so a set variable can be overridden.
    return {"api_key": api_key or None, "tls": args.tls, "ca_cert": args.ca_cert,
            "client_cert": args.client_cert, "client_key": args.client_key}


def describe_error(err: SwitchboardRpcError) -> str:
    """`CODE: details`, with what the call needs when the server refused it for its key, and
    the wait the server asked for when it sent one."""
    hint = AUTH_HINTS.get(err.code)
    line = f"{err.code}: {hint}: {err.details}" if hint else f"{err.code}: {err.details}"
    retry_after = getattr(err, "retry_after_s", None)
    return line if retry_after is None else f"{line} (retry after {retry_after:g} s)"


# ---------------------------------------------------------------------- output helpers


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes else "-"


def _when(unix: float) -> str:
    if not unix:
        return "-"
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


def _ref_text(name: str, version: int) -> str:
    return f"{name}@{version}" if name else "base"


def _describe_result(result: ChatResult) -> str:
    """One line of accounting for stderr: adapter used, tokens, timings, truncation."""
    parts = [
        f"adapter={result.adapter or 'base'}",
        f"finish={result.finish_reason}",
        f"prompt_tokens={result.prompt_tokens}",
        f"completion_tokens={result.completion_tokens}",
        f"ttft={result.ttft_s:.3f}s",
        f"total={result.total_s:.3f}s",
    ]
    trunc = result.truncation
    if trunc.get("applied"):
        parts.append(
            f"truncation={trunc['strategy']} dropped {trunc['messages_dropped']} messages, "
            f"{trunc['tokens_dropped']} tokens"
        )
    return "[" + " ".join(parts) + "]"


# ---------------------------------------------------------------------- chat


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "adapter": args.adapter,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": tuple(args.stop),
        "truncation": args.truncation,
        "session_id": args.session,
    }


def _first_messages(args: argparse.Namespace, text: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": text}]


def _chat_once(client: SwitchboardClient, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.message == "-" else args.message
    messages = _first_messages(args, text)
    result = client.chat(messages, timeout=args.timeout, **_sampling_kwargs(args))
    if args.json:
        _print_json(result.to_dict())
    else:
        print(result.text)
    if args.stats:
        print(_describe_result(result), file=sys.stderr)
    return 0


def _stream_answer(
    client: SwitchboardClient, messages: list[dict[str, str]], args: argparse.Namespace,
    out: TextIO,
) -> ChatResult | None:
    """Print one streamed answer; None when it failed or was cancelled with Ctrl-C."""
    from clients.errors import SwitchboardRpcError

    final = None
    stream = client.chat_stream(messages, timeout=args.timeout, **_sampling_kwargs(args))
    try:
        for chunk in stream:
            out.write(chunk.delta)
            out.flush()
            final = chunk.final or final
    except KeyboardInterrupt:
        stream.cancel()
        print("\n[cancelled]", file=sys.stderr)
        return None
    except SwitchboardRpcError as err:
        print(f"\nerror: {describe_error(err)}", file=sys.stderr)
        return None
    out.write("\n")
    if final is not None and (args.stats or final.truncation.get("applied")):
        print(_describe_result(final), file=sys.stderr)
    return final


def _repl_reset(client: SwitchboardClient, args: argparse.Namespace) -> None:
    from clients.errors import SwitchboardRpcError

    if not args.session:
        print("[conversation cleared]", file=sys.stderr)
        return
    try:
        client.delete_session(args.session, timeout=args.timeout)
        print(f"[session {args.session} deleted]", file=sys.stderr)
    except SwitchboardRpcError as err:
        print(f"error: {describe_error(err)}", file=sys.stderr)


def _next_messages(args: argparse.Namespace, history: list[dict[str, str]], line: str
                   ) -> list[dict[str, str]]:
    """What to send for a new line: the new message only when the server keeps the session."""
    if not history:
        return _first_messages(args, line)  # the system prompt goes with the first turn only
    user = {"role": "user", "content": line}
    return [user] if args.session else [*history, user]


def _chat_repl(client: SwitchboardClient, args: argparse.Namespace) -> int:
    """Interactive streaming chat; history stays here unless the server keeps a session.

    With a session, `history` holds only the last turn: it says whether the system prompt went.
    Fed from a pipe, it exits 1 when any turn failed, so scripts notice.
    """
    interactive = sys.stdin.isatty()
    prompt = "you> " if interactive else ""
    if interactive:
        where = f"session {args.session}" if args.session else "history kept locally"
        print(f"switchboard chat with {args.adapter or 'the base'} at {args.target} ({where}). "
              f"{REPL_HELP}", file=sys.stderr)
    history: list[dict[str, str]] = []
    failed = 0
    while True:
        try:
            line = input(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history.clear()
            _repl_reset(client, args)
        elif line.startswith("/"):
            print(REPL_HELP, file=sys.stderr)
        elif line:
            messages = _next_messages(args, history, line)
            answer = _stream_answer(client, messages, args, sys.stdout)
            if answer is None:
                failed += 1
            else:
                # messages already hold the local history (none when the server keeps it).
                history = [*messages, {"role": "assistant", "content": answer.text}]
    return 1 if failed and not interactive else 0


def _cmd_chat(client: SwitchboardClient, args: argparse.Namespace) -> int:
    return _chat_repl(client, args) if args.message is None else _chat_once(client, args)


# ---------------------------------------------------------------------- adapters


def _cmd_adapters_list(client: SwitchboardClient, args: argparse.Namespace) -> int:
    adapters = client.list_adapters(timeout=args.timeout)
    aliases = client.list_aliases(timeout=args.timeout)
    if args.json:
        _print_json({"adapters": [a.to_dict() for a in adapters],
                     "aliases": [a.to_dict() for a in aliases]})
        return 0
    rows = [
        [a.ref, "yes" if a.loaded else "no", a.rank or "-", _mib(a.memory_bytes), a.in_flight,
         ",".join(a.aliases) or "-", "" if a.compatible else "INCOMPATIBLE BASE"]
        for a in adapters
    ]
    _print_table(["ADAPTER", "LOADED", "RANK", "MEMORY", "IN_FLIGHT", "ALIASES", ""], rows)
    if aliases:
        print()
        _print_table(["ALIAS", "TARGET"], [[a.alias, a.target] for a in aliases])
    return 0


def _cmd_adapters_load(client: SwitchboardClient, args: argparse.Namespace) -> int:
    result = client.load_adapter(args.ref, timeout=args.timeout)
    if args.json:
        _print_json(result.to_dict())
    else:
        a = result.adapter
        print(f"loaded {a.ref} (rank {a.rank}, {_mib(a.memory_bytes)}) "
              f"in {result.load_seconds:.3f} s")
    return 0


def _cmd_adapters_unload(client: SwitchboardClient, args: argparse.Namespace) -> int:
    adapter = client.unload_adapter(args.ref, timeout=args.timeout)
    if args.json:
        _print_json(adapter.to_dict())
    else:
        print(f"unloaded {adapter.ref}")
    return 0


def _cmd_adapters_alias(client: SwitchboardClient, args: argparse.Namespace) -> int:
    alias = client.set_alias(args.alias, args.target_ref, reason=args.reason,
                             timeout=args.timeout)
    if args.json:
        _print_json(alias.to_dict())
    else:
        was = f" (was {alias.previous})" if alias.previous else " (new)"
        print(f"{alias.alias} -> {alias.target}{was}")
    return 0


def _cmd_adapters_history(client: SwitchboardClient, args: argparse.Namespace) -> int:
    moves = client.alias_history(args.alias, timeout=args.timeout)
    if args.json:
        _print_json([m.to_dict() for m in moves])
        return 0
    if not moves:
        print(f"no alias moves recorded{f' for {args.alias}' if args.alias else ''}")
        return 0
    rows = [[m.moved_at, m.alias, m.target, m.previous or "(new)", m.reason or "-"]
            for m in moves]
    _print_table(["MOVED_AT", "ALIAS", "TARGET", "PREVIOUS", "REASON"], rows)
    return 0


# ---------------------------------------------------------------------- sessions


def _cmd_sessions_list(client: SwitchboardClient, args: argparse.Namespace) -> int:
    sessions = client.list_sessions(limit=args.limit, timeout=args.timeout)
    if args.json:
        _print_json([s.to_dict() for s in sessions])
        return 0
    rows = [[s.session_id, s.message_count, _when(s.created_unix), _when(s.updated_unix),
             s.owner or "-"] for s in sessions]
    _print_table(["SESSION", "MESSAGES", "CREATED", "UPDATED", "OWNER"], rows)
    return 0


def _cmd_sessions_show(client: SwitchboardClient, args: argparse.Namespace) -> int:
    session = client.get_session(args.session_id, timeout=args.timeout)
    if args.json:
        _print_json(session.to_dict())
        return 0
    print(f"session {session.session_id}: {len(session.messages)} messages, "
          f"created {_when(session.created_unix)}, updated {_when(session.updated_unix)}")
    if session.summary:
        print(f"summary: {session.summary}")
    for message in session.messages:
        print(f"{message['role']}: {message['content']}")
    return 0


def _cmd_sessions_delete(client: SwitchboardClient, args: argparse.Namespace) -> int:
    deleted = client.delete_session(args.session_id, timeout=args.timeout)
    if args.json:
        _print_json({"session_id": args.session_id, "deleted": deleted})
    else:
        print(f"{'deleted' if deleted else 'no such session'} {args.session_id}")
    return 0 if deleted else 1


def _cmd_sessions_export(client: SwitchboardClient, args: argparse.Namespace) -> int:
    """JSONL, one session a line, in the OpenAI `messages` format that `common.data` reads."""
    ids = args.session_ids or [s.session_id for s in client.list_sessions(timeout=args.timeout)]
    lines = [json.dumps(client.get_session(i, timeout=args.timeout).to_dict(),
                        ensure_ascii=False) for i in ids]
    text = "".join(line + "\n" for line in lines)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"exported {len(lines)} sessions to {args.output}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- audit trail

AUDIT_FIELDS = ("time", "who", "action", "target", "outcome", "detail")


def _audit_entries(path: str) -> list[dict[str, Any]]:
    """The JSON lines of an audit trail; ValueError naming the line that is not JSON."""
    entries = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not a JSON line ({e.msg}); is this the "
                                 "server's --audit-log file?") from None
    return entries


def _cmd_audit(args: argparse.Namespace) -> int:
    """Print the trail, oldest first, filtered by key name, action and outcome."""
    entries = [e for e in _audit_entries(args.file)
               if (not args.who or e.get("who") == args.who)
               and (not args.action or str(e.get("action", "")).startswith(args.action))
               and (not args.failed or e.get("outcome") != "OK")]
    if args.json:
        _print_json(entries)
        return 0
    _print_table([f.upper() for f in AUDIT_FIELDS],
                 [[str(e.get(f, "")) or "-" for f in AUDIT_FIELDS] for e in entries])
    return 0


# ---------------------------------------------------------------------- health, score


def _cmd_health(client: SwitchboardClient, args: argparse.Namespace) -> int:
    status = client.health(args.service, timeout=args.timeout)
    if args.json:
        _print_json({"target": args.target, "service": args.service, "status": status})
    else:
        print(status)
    return 0 if status == "SERVING" else 1


def _cmd_score(client: SwitchboardClient, args: argparse.Namespace) -> int:
    messages = _first_messages(args, args.prompt)
    result = client.score(messages, args.continuation, adapter=args.adapter, timeout=args.timeout)
    if args.json:
        _print_json(result.to_dict())
    else:
        adapter = _ref_text(result.adapter_name, result.adapter_version)
        print(f"log_likelihood={result.log_likelihood:.4f} tokens={result.token_count} "
              f"perplexity={result.perplexity:.3f} prompt_tokens={result.prompt_tokens} "
              f"adapter={adapter}")
    return 0


# ---------------------------------------------------------------------- parser


def _common_options(target_default: str) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=target_default,
                        help=f"server HOST:PORT (default: $SWITCHBOARD_TARGET or {DEFAULT_TARGET})")
    common.add_argument("--timeout", type=float, default=None,
                        help="deadline in seconds for each command's call (default: none)")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_security_options(common)
    return common


def _add_chat(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("chat", parents=[common], help="ask one question, or chat interactively",
                       description="With MESSAGE: print one answer. Without: an interactive "
                       "streaming chat (" + REPL_HELP + ").")
    p.add_argument("message", nargs="?", help="the question ('-' reads stdin); omit to chat")
    p.add_argument("--adapter", default="", help="name, name@version or alias (default: base)")
    p.add_argument("--system", default="", help="system prompt for a new conversation")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = the server's default")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="above 1 discourages tokens already in the conversation (default 1: off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--session", default="", metavar="ID",
                   help="keep the conversation on the server under this id")
    p.add_argument("--truncation", default="", choices=("", *TRUNCATION_CHOICES),
                   metavar="STRATEGY", help=f"one of {', '.join(TRUNCATION_CHOICES)} "
                   "(default: the server's)")
    p.add_argument("--stats", action="store_true",
                   help="print adapter, token counts, timings and truncation to stderr")
    p.set_defaults(handler=_cmd_chat)


def _add_adapters(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("adapters", help="list, load, unload and alias adapters; alias history")
    cmds = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    cmds.add_parser("list", parents=[common], help="adapters on disk and loaded, and aliases"
                    ).set_defaults(handler=_cmd_adapters_list)
    load = cmds.add_parser("load", parents=[common], help="load an adapter now")
    load.add_argument("ref", help="name, name@version or alias")
    load.set_defaults(handler=_cmd_adapters_load)
    unload = cmds.add_parser("unload", parents=[common], help="unload a loaded adapter")
    unload.add_argument("ref", help="name, name@version or alias")
    unload.set_defaults(handler=_cmd_adapters_unload)
    alias = cmds.add_parser("alias", parents=[common], help="point an alias at a version")
    alias.add_argument("alias", metavar="ALIAS")
    alias.add_argument("target_ref", metavar="NAME@VERSION")
    alias.add_argument("--reason", default="", metavar="TEXT",
                       help="why (kept with the move in the server's alias history)")
    alias.set_defaults(handler=_cmd_adapters_alias)
    history = cmds.add_parser("history", parents=[common],
                              help="alias moves recorded beside the adapters, oldest first")
    history.add_argument("alias", nargs="?", default="", metavar="ALIAS",
                         help="only this alias (default: every alias)")
    history.set_defaults(handler=_cmd_adapters_history)


def _add_sessions(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sessions", help="list, show, delete and export server-side sessions")
    cmds = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = cmds.add_parser("list", parents=[common], help="stored sessions")
    ls.add_argument("--limit", type=int, default=0, help="at most this many (0 = all)")
    ls.set_defaults(handler=_cmd_sessions_list)
    show = cmds.add_parser("show", parents=[common], help="print one session's messages")
    show.add_argument("session_id", metavar="ID")
    show.set_defaults(handler=_cmd_sessions_show)
    delete = cmds.add_parser("delete", parents=[common], help="delete one session")
    delete.add_argument("session_id", metavar="ID")
    delete.set_defaults(handler=_cmd_sessions_delete)
    export = cmds.add_parser("export", parents=[common],
                             help="write sessions as JSONL (OpenAI messages format)")
    export.add_argument("session_ids", nargs="*", metavar="ID", help="default: every session")
    export.add_argument("-o", "--output", default=None, help="file to write (default: stdout)")
    export.set_defaults(handler=_cmd_sessions_export)


def _add_others(sub: Any, common: argparse.ArgumentParser) -> None:
    health = sub.add_parser("health", parents=[common],
                            help="grpc.health.v1 status; exit 0 only when SERVING")
    health.add_argument("--service", default="", help="service name (default: the server)")
    health.set_defaults(handler=_cmd_health)
    score = sub.add_parser("score", parents=[common],
                           help="log-likelihood of an answer after a question")
    score.add_argument("prompt", help="the user message")
    score.add_argument("continuation", help="the assistant text to score")
    score.add_argument("--adapter", default="", help="name, name@version or alias")
    score.add_argument("--system", default="", help="system prompt before the question")
    score.set_defaults(handler=_cmd_score)
    audit = sub.add_parser("audit", help="print a server's audit trail (its --audit-log file)")
    audit.add_argument("file", metavar="FILE", help="the server's --audit-log file")
    audit.add_argument("--who", default="", metavar="NAME", help="only this key's actions")
    audit.add_argument("--action", default="", metavar="PREFIX",
                       help="only actions starting with this (adapter., alias.set, session., "
                            "keys.)")
    audit.add_argument("--failed", action="store_true", help="only refused or failed actions")
    audit.add_argument("--json", action="store_true", help="print machine-readable JSON")
    audit.set_defaults(local=_cmd_audit)
    sub.add_parser("serve", add_help=False,
                   help="run the server (same as `switchboard-server serve`; see --help there)")


def build_parser(target_default: str = DEFAULT_TARGET) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard", description="Chat with, and administer, a Switchboard server.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options(target_default)
    _add_chat(sub, common)
    _add_adapters(sub, common)
    _add_sessions(sub, common)
    _add_others(sub, common)
    return parser


def exec_server(args: Sequence[str]) -> None:
    """Replace this process with the server CLI, so no server import happens here."""
    argv = [sys.executable, "-m", "server.cli", "serve", *args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        exec_server(argv[1:])
        return 0  # only reached when execv is replaced (tests)
    args = build_parser(os.environ.get("SWITCHBOARD_TARGET", DEFAULT_TARGET)).parse_args(argv)
    if hasattr(args, "local"):  # reads a local file; no server, no key
        try:
            return args.local(args)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1

    from clients.client import SwitchboardClient
    from clients.errors import SwitchboardRpcError

    try:
        security = security_kwargs(args, os.environ.get(API_KEY_ENV))
        with SwitchboardClient(args.target, **security) as client:
            return args.handler(client, args)
    except SwitchboardRpcError as err:
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
