"""The clients' security options against the real server: API and admin keys, TLS, mutual TLS.

One server checks keys (plaintext, loopback), one serves TLS, one requires client certificates;
the sync client, the asyncio client, the `switchboard` CLI and the `evalsuite` CLI all reach them
with the same options. Keys never show in a client's repr or in the errors the client raises.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from clients import cli
from clients.aio import AsyncSwitchboardClient
from clients.client import SwitchboardClient
from clients.errors import PermissionDeniedError, SwitchboardRpcError, UnauthenticatedError
from evalsuite.cli import main as evalsuite_main

API_KEY = "api-key-for-tests-0123456789"
ADMIN_KEY = "admin-key-for-tests-0123456789"
UNKNOWN_KEY = "nobody-knows-this-key-0123456789"
# Fast failure when a call cannot work (wrong certificate): no retries, a short deadline.
NO_RETRY: dict[str, Any] = {"retries": 0, "timeout": 10}


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def start_server(tiny_base: Path, adapters_root: Path, work: Path, **security: Any) -> Any:
    from server.app import start_in_thread
    from server.config import ServerConfig

    # A copy: promotion tests move aliases, which are written into the adapters root.
    root = shutil.copytree(adapters_root, work / "adapters")
    config = ServerConfig.build(base=str(tiny_base), adapters_root=root, port=0,
                                sessions_db=work / "sessions.db", default_max_new_tokens=2,
                                **security)
    return start_in_thread(config)


@pytest.fixture(scope="module")
def auth_target(tiny_base: Path, adapters_root: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    running = start_server(tiny_base, adapters_root, tmp_path_factory.mktemp("auth-server"),
                           api_keys=(API_KEY,), admin_keys=(ADMIN_KEY,))
    yield f"127.0.0.1:{running.port}"
    running.stop()


@pytest.fixture(scope="module")
def tls_target(tiny_base: Path, adapters_root: Path, tls_files: Any,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    running = start_server(tiny_base, adapters_root, tmp_path_factory.mktemp("tls-server"),
                           tls_cert=tls_files.server_cert, tls_key=tls_files.server_key)
    yield f"127.0.0.1:{running.port}"
    running.stop()


@pytest.fixture(scope="module")
def mtls_target(tiny_base: Path, adapters_root: Path, tls_files: Any,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    running = start_server(tiny_base, adapters_root, tmp_path_factory.mktemp("mtls-server"),
                           tls_cert=tls_files.server_cert, tls_key=tls_files.server_key,
                           tls_client_ca=tls_files.ca)
    yield f"127.0.0.1:{running.port}"
    running.stop()


# ---------------------------------------------------------------------- without a server


def test_a_missing_pem_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    with pytest.raises(ValueError, match=r"ca_cert: no such file: .*missing-ca\.pem"):
        SwitchboardClient("127.0.0.1:1", ca_cert=missing)
    not_pem = tmp_path / "client.txt"
    not_pem.write_text("not a certificate")
    with pytest.raises(ValueError, match=r"client_cert: .*client\.txt is not a PEM file"):
        SwitchboardClient("127.0.0.1:1", client_cert=not_pem, client_key=not_pem)


def test_mutual_tls_needs_both_files(tls_files: Any) -> None:
    with pytest.raises(ValueError, match="client_cert and client_key are given together"):
        SwitchboardClient("127.0.0.1:1", client_cert=tls_files.client_cert)


def test_explicit_credentials_exclude_the_tls_options(tls_files: Any) -> None:
    import grpc

    with pytest.raises(ValueError, match="either credentials or tls"):
        SwitchboardClient("127.0.0.1:1", ca_cert=tls_files.ca,
                          credentials=grpc.ssl_channel_credentials())


def test_the_key_stays_out_of_repr_and_messages() -> None:
    with SwitchboardClient("127.0.0.1:1", api_key=API_KEY) as client:
        assert API_KEY not in repr(client) and "api key" in repr(client)

    async def async_repr() -> str:
        async with AsyncSwitchboardClient("127.0.0.1:1", api_key=API_KEY) as client:
            return repr(client)

    assert API_KEY not in run(async_repr())
    bad_key = "has a space-0123456789"
    with pytest.raises(ValueError, match="printable ASCII without spaces") as info:
        SwitchboardClient("127.0.0.1:1", api_key=bad_key)
    assert bad_key not in str(info.value)


# ---------------------------------------------------------------------- keys, sync client


def test_an_api_key_may_chat_and_stream(auth_target: str) -> None:
    with SwitchboardClient(auth_target, api_key=API_KEY, timeout=60) as client:
        assert client.chat("Hi", max_new_tokens=2).completion_tokens > 0
        chunks = list(client.chat_stream("Hi", max_new_tokens=2))
        assert chunks[-1].final is not None and chunks[-1].final.completion_tokens > 0
        assert client.score("Hi", "Hello").token_count > 0


def test_no_key_or_an_unknown_key_is_unauthenticated(auth_target: str) -> None:
    with SwitchboardClient(auth_target, **NO_RETRY) as client:
        with pytest.raises(UnauthenticatedError) as info:
            client.chat("Hi", max_new_tokens=2)
        assert info.value.code == "UNAUTHENTICATED"
        with pytest.raises(UnauthenticatedError):
            list(client.chat_stream("Hi", max_new_tokens=2))
        assert client.health() == "SERVING"  # probes need no key
    with SwitchboardClient(auth_target, api_key=UNKNOWN_KEY, **NO_RETRY) as client:
        with pytest.raises(UnauthenticatedError) as info:
            client.chat("Hi", max_new_tokens=2)
    assert UNKNOWN_KEY not in str(info.value) and UNKNOWN_KEY not in info.value.details


def test_an_api_key_on_admin_calls_is_permission_denied(auth_target: str) -> None:
    with SwitchboardClient(auth_target, api_key=API_KEY, **NO_RETRY) as client:
        with pytest.raises(PermissionDeniedError) as info:
            client.list_adapters()
        assert info.value.code == "PERMISSION_DENIED"
        with pytest.raises(PermissionDeniedError):
            client.set_alias("canary", "alpha@1")
        # Sessions are a tenant's own (issue 19): an API key lists only sessions it made, never
        # another key's or an admin-only one (tests/server/test_tenants.py covers the rest).
        owners = {s.owner for s in client.list_sessions()}
        assert "" not in owners and len(owners) <= 1


def test_an_admin_key_may_call_everything(auth_target: str) -> None:
    with SwitchboardClient(auth_target, api_key=ADMIN_KEY, timeout=60) as client:
        assert {"alpha@1", "alpha@2", "beta@1"} <= {a.ref for a in client.list_adapters()}
        assert isinstance(client.list_sessions(), list)
        assert client.chat("Hi", max_new_tokens=2).completion_tokens > 0


# ---------------------------------------------------------------------- keys, asyncio client


def test_the_async_client_sends_the_key_on_every_kind_of_call(auth_target: str) -> None:
    async def scenario() -> None:
        async with AsyncSwitchboardClient(auth_target, api_key=API_KEY, timeout=60) as client:
            assert (await client.chat("Hi", max_new_tokens=2)).completion_tokens > 0
            chunks = [c async for c in client.chat_stream("Hi", max_new_tokens=2)]
            assert chunks[-1].final is not None
            with pytest.raises(PermissionDeniedError):
                await client.list_adapters()
        async with AsyncSwitchboardClient(auth_target, **NO_RETRY) as client:
            with pytest.raises(UnauthenticatedError):
                await client.chat("Hi", max_new_tokens=2)
            with pytest.raises(UnauthenticatedError):
                _ = [c async for c in client.chat_stream("Hi", max_new_tokens=2)]
        async with AsyncSwitchboardClient(auth_target, api_key=ADMIN_KEY, timeout=60) as client:
            assert {"alpha@1", "beta@1"} <= {a.ref for a in await client.list_adapters()}

    run(scenario())


# ---------------------------------------------------------------------- keys, CLIs


def test_cli_sends_the_key_from_the_flag_or_the_environment(
    auth_target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)
    code, out, err = run_cli(capsys, "chat", "--target", auth_target, "Hi")
    assert code == 1 and out == ""
    assert err.startswith("error: UNAUTHENTICATED: ") and "--api-key" in err
    assert err.count("\n") == 1

    code, out, _ = run_cli(capsys, "chat", "--target", auth_target, "--api-key", API_KEY, "Hi")
    assert code == 0 and out.endswith("\n")

    monkeypatch.setenv(cli.API_KEY_ENV, API_KEY)
    code, _, _ = run_cli(capsys, "chat", "--target", auth_target, "--json", "Hi")
    assert code == 0
    code, out, err = run_cli(capsys, "adapters", "list", "--target", auth_target)
    assert code == 1 and out == "" and API_KEY not in err
    assert err.startswith("error: PERMISSION_DENIED: this call needs an admin key")
    # The flag wins over the environment.
    code, out, _ = run_cli(capsys, "adapters", "list", "--target", auth_target,
                           "--api-key", ADMIN_KEY)
    assert code == 0 and out.startswith("ADAPTER")


def test_switchboard_help_lists_the_security_options(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    with pytest.raises(SystemExit):
        cli.main(["chat", "--help"])
    out = capsys.readouterr().out
    for option in ("--api-key", "--tls", "--ca-cert", "--client-cert", "--client-key",
                   cli.API_KEY_ENV):
        assert option in out


def write_gated_report(directory: Path, candidate: str) -> Path:
    """The parts of an `evalsuite run` report that promotion reads: the gate passed."""
    directory.mkdir(parents=True, exist_ok=True)
    report = {"adapters": [{"key": candidate, "requested": candidate}],
              "candidates": [candidate],
              "gate": {"results": {candidate: {"passed": True, "checks": []}}}}
    (directory / "report.json").write_text(json.dumps(report))
    return directory


def test_evalsuite_promote_needs_an_admin_key(
    auth_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    report = write_gated_report(tmp_path / "report", "alpha@2")
    argv = ["promote", "--target", auth_target, "--alias", "secure-canary",
            "--candidate", "alpha@2", "--report", str(report)]
    monkeypatch.setenv(cli.API_KEY_ENV, API_KEY)
    assert evalsuite_main(argv) == 2
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and "admin key" in err and API_KEY not in err

    assert evalsuite_main([*argv, "--api-key", ADMIN_KEY]) == 0
    assert "secure-canary -> alpha@2" in capsys.readouterr().out
    with SwitchboardClient(auth_target, api_key=ADMIN_KEY, timeout=30) as client:
        assert {"secure-canary": "alpha@2"}.items() <= {
            a.alias: a.target for a in client.list_aliases()}.items()


def test_evalsuite_help_says_promote_needs_an_admin_key(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert evalsuite_main(["promote", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ADMIN key" in out and "--client-cert" in out


def test_evalsuite_run_passes_the_key_through(
    auth_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    testset = tmp_path / "one.jsonl"
    testset.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}) + "\n")
    argv = ["run", "--target", auth_target, "--testset", str(testset),
            "--adapters", "__base__,alpha@1", "--out", str(tmp_path / "out"),
            "--max-new-tokens", "2", "--no-score", "--no-progress", "--no-cache",
            "--bootstrap", "10", "--timeout", "30"]
    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)
    assert evalsuite_main(argv) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err

    monkeypatch.setenv(cli.API_KEY_ENV, API_KEY)
    assert evalsuite_main(argv) in (0, 1)  # a verdict, not an error
    assert (tmp_path / "out" / "report.json").exists()


def test_evalsuite_names_a_missing_certificate(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["promote", "--target", "127.0.0.1:1", "--alias", "a", "--candidate", "a@1",
            "--report", str(tmp_path), "--ca-cert", str(tmp_path / "absent.pem")]
    assert evalsuite_main(argv) == 2
    assert "absent.pem" in capsys.readouterr().err


# ---------------------------------------------------------------------- TLS and mutual TLS


def test_tls_with_the_ca_that_signed_the_server(tls_target: str, tls_files: Any) -> None:
    with SwitchboardClient(tls_target, ca_cert=tls_files.ca, timeout=60) as client:
        assert client.chat("Hi", max_new_tokens=2).completion_tokens > 0
        assert "tls" in repr(client)

    async def async_chat() -> int:
        async with AsyncSwitchboardClient(tls_target, ca_cert=str(tls_files.ca),
                                          timeout=60) as client:
            return (await client.chat("Hi", max_new_tokens=2)).completion_tokens

    assert run(async_chat()) > 0


def test_tls_refuses_an_untrusted_server_and_plaintext(tls_target: str) -> None:
    # The test CA is not among the system's roots, so the server's certificate is not trusted.
    with SwitchboardClient(tls_target, tls=True, **NO_RETRY) as client:
        with pytest.raises(SwitchboardRpcError) as info:
            client.chat("Hi", max_new_tokens=2)
    assert info.value.code == "UNAVAILABLE"
    with SwitchboardClient(tls_target, **NO_RETRY) as client:
        with pytest.raises(SwitchboardRpcError) as info:
            client.chat("Hi", max_new_tokens=2)
    assert info.value.code == "UNAVAILABLE"


def test_cli_over_tls(tls_target: str, tls_files: Any,
                      capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "health", "--target", tls_target, "--ca-cert", str(tls_files.ca)
                   ) == (0, "SERVING\n", "")
    code, _, err = run_cli(capsys, "health", "--target", tls_target, "--ca-cert",
                           str(tls_files.ca.with_name("absent.pem")))
    assert code == 1 and "ca_cert: no such file" in err and "absent.pem" in err


def test_mutual_tls_needs_a_client_certificate_the_server_trusts(
    mtls_target: str, tls_files: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with SwitchboardClient(mtls_target, ca_cert=tls_files.ca, client_cert=tls_files.client_cert,
                           client_key=tls_files.client_key, timeout=60) as client:
        assert client.chat("Hi", max_new_tokens=2).completion_tokens > 0
        assert "mtls" in repr(client)
    for cert, key in ((None, None), (tls_files.stranger_cert, tls_files.stranger_key)):
        with SwitchboardClient(mtls_target, ca_cert=tls_files.ca, client_cert=cert,
                               client_key=key, **NO_RETRY) as client:
            with pytest.raises(SwitchboardRpcError) as info:
                client.chat("Hi", max_new_tokens=2)
        assert info.value.code == "UNAVAILABLE"
    code, out, _ = run_cli(capsys, "chat", "--target", mtls_target, "--ca-cert",
                           str(tls_files.ca), "--client-cert", str(tls_files.client_cert),
                           "--client-key", str(tls_files.client_key), "Hi")
    assert code == 0 and out.endswith("\n")
