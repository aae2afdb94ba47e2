"""API keys and TLS settings without a network: key files, the key table, config and flags, and
the client's rules for sending a key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grpc
import pytest
from remoteloss._channel import api_key_metadata, is_loopback, tls_credentials
from remoteloss_server import app, auth, cli
from remoteloss_server.config import ServerConfig

KEY_A = "a" * 16
KEY_B = "0123456789abcdef0123"


def test_key_lines_comments_commas_and_several_keys_per_tenant() -> None:
    table = auth.parse_keys(f"# comment\n\nalice:{KEY_A}\n  bob:{KEY_B} , alice:{'z' * 40}\n", "keys")
    assert table.tenants == {"alice", "bob"}
    assert table.tenant(KEY_A) == "alice" and table.tenant("z" * 40) == "alice" and table.tenant(KEY_B) == "bob"
    assert table.tenant(KEY_A + "x") is None and table.tenant("") is None and table.tenant(KEY_A[:-1]) is None
    assert all(KEY_A not in repr(entry) for entry in table.entries)  # only digests are kept


def test_a_key_may_hold_any_printable_character_but_spaces_and_commas() -> None:
    key = "!#$%&'()*+-./:;<=>?@[]^_`{|}~09AZaz"
    assert auth.parse_keys(f"t:{key}", "keys").tenant(key) == "t"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"keys: no keys"),
        ("# only a comment\n", r"keys: no keys"),
        (f"{KEY_A}\n", r"keys: entry 1 is not 'tenant:key'"),
        (f"alice:{KEY_A}\n:{KEY_B}", r"keys: entry 2: the tenant must be"),
        (f"al ice:{KEY_A}", r"keys: entry 1: the tenant must be"),
        ("alice:short", r"keys: entry 1 \(tenant alice\): the key must be 16 to 512"),
        ("alice:" + "k" * 513, r"the key must be 16 to 512"),
        (f"alice:{KEY_A}\nbob:{KEY_A}", r"keys: entry 2 \(tenant bob\): this key is listed twice"),
        (f"alice:{KEY_A[:8]} {KEY_A[8:]}", r"entry 1 \(tenant alice\): the key must be"),
    ],
)
def test_bad_key_entries_are_named_by_position_never_by_key(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        auth.parse_keys(text, "keys")
    assert KEY_A not in str(info.value) and KEY_A[:8] not in str(info.value)


def test_load_keys_joins_the_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alice:{KEY_A}\n")
    assert auth.load_keys(None, None) is None
    table = auth.load_keys(str(path), f"bob:{KEY_B}")
    assert table is not None and table.tenants == {"alice", "bob"}
    with pytest.raises(ValueError, match="both in the API keys file and in REMOTELOSS_API_KEYS"):
        auth.load_keys(str(path), f"carol:{KEY_A}")
    with pytest.raises(OSError):
        auth.load_keys(str(tmp_path / "missing"), None)


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        ({"tls_cert": "c.pem"}, "tls_cert and tls_key"),
        ({"tls_key": "k.pem"}, "tls_cert and tls_key"),
        ({"tls_client_ca": "ca.pem"}, "tls_client_ca"),
        ({"api_keys_file": ""}, "api_keys_file"),
        ({"max_elements": 0}, "max_elements"),
    ],
)
def test_validate_security_settings(changes: dict[str, Any], setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        ServerConfig(**changes).validate()


def test_the_keys_never_show_in_the_config() -> None:
    assert KEY_A not in repr(ServerConfig(api_keys=f"alice:{KEY_A}"))


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[ServerConfig] = []
    monkeypatch.setattr(app, "serve", served.append)
    for name in ("REMOTELOSS_API_KEYS", "REMOTELOSS_API_KEYS_FILE", "REMOTELOSS_TLS_CERT", "REMOTELOSS_MAX_ELEMENTS"):
        monkeypatch.delenv(name, raising=False)
    flags = ["--api-keys-file", "k", "--tls-cert", "c", "--tls-key", "p", "--tls-client-ca", "ca", "--max-elements", "9"]
    assert cli.main(flags) == 0
    assert dataclasses.astuple(served[-1])[-6:] == (9, "k", None, "c", "p", "ca")
    monkeypatch.setenv("REMOTELOSS_API_KEYS", f"alice:{KEY_A}")
    monkeypatch.setenv("REMOTELOSS_TLS_CERT", "env.pem")
    assert cli.main(["--tls-key", "p"]) == 0
    assert served[-1].api_keys == f"alice:{KEY_A}" and served[-1].tls_cert == "env.pem"


def test_no_flag_takes_the_keys_themselves(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--api-keys", f"alice:{KEY_A}"]) == 2  # not an abbreviation of --api-keys-file
    assert "unrecognized arguments: --api-keys" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "REMOTELOSS_API_KEYS" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- client side


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("localhost:50051", True),
        ("LOCALHOST:1", True),
        ("127.0.0.1:50051", True),
        ("127.1.2.3:1", True),
        ("[::1]:50051", True),
        ("dns:///localhost:50051", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("ipv6:[::1]:1", True),
        ("unix:/run/remoteloss.sock", True),
        ("unix:///run/remoteloss.sock", True),
        ("example.com:50051", False),
        ("10.0.0.7:50051", False),
        ("[::]:50051", False),
        ("0.0.0.0:50051", False),
        ("localhost.example.com:1", False),
        ("dns://10.0.0.53/localhost:1", False),  # a DNS server of the target's own choosing
        ("ipv4:127.0.0.1:1,10.0.0.1:2", False),
    ],
)
def test_is_loopback(target: str, loopback: bool) -> None:
    assert is_loopback(target) is loopback


def test_a_key_goes_as_bearer_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REMOTELOSS_API_KEY", raising=False)
    assert api_key_metadata("example.com:1", None, secure=False) == ()
    assert api_key_metadata("localhost:1", KEY_A, secure=False) == (("authorization", f"Bearer {KEY_A}"),)
    assert api_key_metadata("example.com:1", KEY_A, secure=True) == (("authorization", f"Bearer {KEY_A}"),)
    monkeypatch.setenv("REMOTELOSS_API_KEY", KEY_B)
    assert api_key_metadata("localhost:1", None, secure=False) == (("authorization", f"Bearer {KEY_B}"),)
    monkeypatch.setenv("REMOTELOSS_API_KEY", "")
    assert api_key_metadata("localhost:1", None, secure=False) == ()


def test_a_key_never_travels_in_plaintext_to_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    import remoteloss

    with pytest.raises(ValueError, match="plaintext to example.com:1"):
        api_key_metadata("example.com:1", KEY_A, secure=False)
    with pytest.raises(ValueError, match="plaintext"):
        remoteloss.Client("example.com:1", api_key=KEY_A)
    monkeypatch.setenv("REMOTELOSS_API_KEY", KEY_A)
    with pytest.raises(ValueError, match="plaintext"):
        remoteloss.AsyncClient("10.0.0.7:50051")
    with pytest.raises(ValueError, match="printable ASCII"):
        api_key_metadata("localhost:1", "has space", secure=False)


def test_tls_settings(tmp_path: Path) -> None:
    assert tls_credentials() is None
    assert isinstance(tls_credentials(tls=True), grpc.ChannelCredentials)
    own = grpc.ssl_channel_credentials()
    assert tls_credentials(credentials=own) is own
    with pytest.raises(ValueError, match="credentials excludes"):
        tls_credentials(credentials=own, tls=True)
    with pytest.raises(ValueError, match="client_cert and client_key go together"):
        tls_credentials(client_cert=b"cert")
    with pytest.raises(FileNotFoundError):
        tls_credentials(root_certificates=tmp_path / "missing.pem")
    with pytest.raises(TypeError, match="root_certificates must be PEM bytes or a file path"):
        tls_credentials(root_certificates=1)  # type: ignore[arg-type]
