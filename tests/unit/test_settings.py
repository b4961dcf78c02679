"""Typed configuration (`gateway.settings`), the shipped examples and `check-config` reporting."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from gateway.cli import main
from gateway.keys import generate_private_key_pem
from gateway.settings import (
    ConfigError,
    GatewayFile,
    Policy,
    load_settings,
    parse_duration,
    parse_size,
)
from tests.fixtures.config import TEST_CLIENT_SECRET, TEST_ENCRYPTION_KEY, make_config

REPO = Path(__file__).resolve().parents[2]


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value.problems


class TestValues:
    @pytest.mark.parametrize(
        ("given", "seconds"),
        [
            ("15m", 900.0),
            ("12h", 43200.0),
            ("30s", 30.0),
            ("500ms", 0.5),
            ("30d", 2592000.0),
            (" 2 s ", 2.0),
            ("1.5h", 5400.0),
            (30, 30.0),
            (0.25, 0.25),
        ],
    )
    def test_durations(self, given: object, seconds: float) -> None:
        """Durations take a unit; bare numbers are seconds."""
        assert parse_duration(given) == seconds

    @pytest.mark.parametrize("given", ["15", "5 minutes", "", "-1s", True, -1, None, "1w"])
    def test_bad_durations(self, given: object) -> None:
        """A string without a unit, a negative or a bool is refused, not guessed."""
        with pytest.raises(ValueError, match=r"duration|negative"):
            parse_duration(given)

    @pytest.mark.parametrize(
        ("given", "size"),
        [("64KiB", 65536), ("1MiB", 1048576), ("1MB", 1000000), (512, 512), ("10", 10)],
    )
    def test_sizes(self, given: object, size: int) -> None:
        """Sizes take binary or decimal units; bare numbers are bytes."""
        assert parse_size(given) == size

    @pytest.mark.parametrize("given", ["1GB", "-1", "lots", True, -5])
    def test_bad_sizes(self, given: object) -> None:
        """Unknown units and negatives are refused."""
        with pytest.raises(ValueError, match="size"):
            parse_size(given)

    def test_durations_in_files(self, tmp_path: Path) -> None:
        """Durations in gateway.toml and policies are parsed to seconds."""
        path = make_config(
            tmp_path,
            store={"timeout": "750ms"},
            policy={"tokens": {"mfa_max_age": "8h"}, "consent": {"remember": 0}},
        )
        settings = load_settings(path)
        assert settings.store.timeout == 0.75
        assert settings.global_policy.tokens.mfa_max_age == 28800.0
        assert settings.global_policy.consent.remember == 0.0

    def test_bad_duration_names_file_and_key(self, tmp_path: Path) -> None:
        """A duration without unit is reported with the file and dotted key."""
        path = make_config(tmp_path, policy={"tokens": {"access_token_ttl": "15"}})
        assert _problems(path) == [
            f"{tmp_path}/policies/default.toml: tokens.access_token_ttl: "
            "expected a duration like '15m', '12h' or '30s', got '15'"
        ]


class TestSecrets:
    def test_env_reference(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """`env:NAME` is read from the environment at load time."""
        monkeypatch.setenv("T_CLIENT_SECRET", "from-the-environment")
        settings = load_settings(
            make_config(tmp_path, upstream={"client_secret": "env:T_CLIENT_SECRET"})
        )
        assert settings.upstream.client_secret.get_secret_value() == "from-the-environment"

    def test_missing_env_is_a_problem(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unset variable is reported by name, at the key that uses it."""
        monkeypatch.delenv("T_UNSET_KEY", raising=False)
        path = make_config(tmp_path, store={"encryption_key": "env:T_UNSET_KEY"})
        assert _problems(path) == [
            f"{path}: store.encryption_key: environment variable T_UNSET_KEY is not set"
        ]

    def test_file_reference_relative_to_config(self, tmp_path: Path) -> None:
        """`file:PATH` is relative to gateway.toml's folder; surrounding whitespace is removed."""
        (tmp_path / "secrets").mkdir()
        (tmp_path / "secrets" / "cookie").write_text("c" * 40 + "\n", "utf-8")
        settings = load_settings(
            make_config(tmp_path, keys={"cookie_secret": "file:secrets/cookie"})
        )
        assert settings.keys.cookie_secret.get_secret_value() == "c" * 40

    def test_missing_file_is_a_problem(self, tmp_path: Path) -> None:
        """An unreadable secret file is reported at its key, with the path."""
        path = make_config(tmp_path, upstream={"client_secret": "file:nope.txt"})
        assert _problems(path) == [
            f"{path}: upstream.client_secret: cannot read secret file "
            f"{tmp_path}/nope.txt: No such file or directory"
        ]

    def test_secrets_are_masked(self, tmp_path: Path) -> None:
        """Secrets never show in the repr of the settings (R35)."""
        settings = load_settings(make_config(tmp_path))
        text = repr(settings)
        assert TEST_CLIENT_SECRET not in text
        assert TEST_ENCRYPTION_KEY not in text
        assert settings.keys.cookie_secret.get_secret_value() not in text

    def test_bad_secret_value_is_not_echoed(self, tmp_path: Path) -> None:
        """A wrong encryption key is reported without echoing it."""
        path = make_config(tmp_path, store={"encryption_key": "c2hvcnQ"})
        (problem,) = _problems(path)
        assert problem.startswith(f"{path}: store.encryption_key: must be base64url of exactly 32")
        assert "c2hvcnQ" not in problem


class TestStructure:
    def test_unknown_keys_everywhere(self, tmp_path: Path) -> None:
        """Unknown keys are errors in every table, in gateway.toml and in policies."""
        path = make_config(
            tmp_path,
            server={"listn": "0.0.0.0:1"},
            resources=[{"path": "/mcp", "upstream": "http://127.0.0.1:9", "polcy": "x"}],
            extra_top=1,
            policy={"stepup": {"digit": 6}, "mcp": {"rules": [{"metod": "x"}]}},
        )
        assert sorted(_problems(path)) == sorted(
            [
                f"{path}: server.listn: unknown key",
                f"{path}: resources[0].polcy: unknown key",
                f"{path}: extra_top: unknown key",
                f"{tmp_path}/policies/default.toml: stepup.digit: unknown key",
                f"{tmp_path}/policies/default.toml: mcp.rules[0].metod: unknown key",
            ]
        )

    def test_missing_required_keys(self, tmp_path: Path) -> None:
        """Required keys that are absent are named."""
        path = make_config(tmp_path, upstream={"client_id": None}, server={"public_url": None})
        assert sorted(_problems(path)) == [
            f"{path}: server.public_url: required key is missing",
            f"{path}: upstream.client_id: required key is missing",
        ]

    def test_not_toml(self, tmp_path: Path) -> None:
        """A file that is not TOML is one clear problem."""
        path = tmp_path / "gateway.toml"
        path.write_text("[server\nlisten = ", "utf-8")
        (problem,) = _problems(path)
        assert problem.startswith(f"{path}: (file): not valid TOML: ")

    def test_policy_references(self, tmp_path: Path) -> None:
        """A resource naming a policy without a file is an error naming the key."""
        path = make_config(
            tmp_path, resources=[{"path": "/mcp", "upstream": "http://x", "policy": "strict"}]
        )
        assert _problems(path) == [
            f"{path}: resources[0].policy: no policy file strict.toml in {tmp_path}/policies"
        ]

    def test_resource_paths(self, tmp_path: Path) -> None:
        """Resource paths are normalised, unique and never shadow gateway paths."""
        path = make_config(
            tmp_path,
            resources=[
                {"path": "/oauth/mcp", "upstream": "http://x"},
                {"path": "/a/../b", "upstream": "http://x"},
                {"path": "/c/", "upstream": "http://x"},
            ],
        )
        assert _problems(path) == [
            f"{path}: resources[0].path: collides with a gateway path: '/oauth/mcp'",
            f"{path}: resources[1].path: must be a normalised path, got '/a/../b'",
            f"{path}: resources[2].path: expected an absolute path without trailing slash, "
            "got '/c/'",
        ]
        dup = make_config(
            tmp_path,
            resources=[
                {"path": "/m", "upstream": "http://x"},
                {"path": "/m", "upstream": "http://y"},
            ],
        )
        assert _problems(dup) == [f"{dup}: resources: duplicate path(s) ['/m']"]

    def test_signing_key_file_must_exist(self, tmp_path: Path) -> None:
        """A configured key file that does not exist is reported."""
        path = make_config(tmp_path, keys={"signing": [{"kid": "k1", "file": "keys/none.pem"}]})
        assert _problems(path) == [
            f"{path}: keys.signing[0].file: no such file {tmp_path}/keys/none.pem"
        ]


class TestTransport:
    def test_https_public_url(self, tmp_path: Path) -> None:
        """An https public_url is the issuer, and turns on Secure/__Host- cookies."""
        settings = load_settings(
            make_config(
                tmp_path, server={"public_url": "https://gw.example/", "dev_http_loopback": None}
            )
        )
        assert settings.issuer == "https://gw.example"
        assert settings.server.secure_cookies is True

    def test_http_public_url_refused_off_loopback(self, tmp_path: Path) -> None:
        """Plain http on a routable host is refused even with the dev setting (R36)."""
        path = make_config(tmp_path, server={"public_url": "http://gw.example"})
        assert _problems(path) == [
            f"{path}: server.public_url: plain http is allowed only on a loopback address"
        ]

    def test_http_loopback_needs_the_named_setting(self, tmp_path: Path) -> None:
        """Plain http on loopback needs `server.dev_http_loopback = true` (DESIGN §5)."""
        path = make_config(tmp_path, server={"dev_http_loopback": None})
        assert _problems(path) == [
            f"{path}: server.public_url: plain http needs server.dev_http_loopback = true "
            "(development only)"
        ]
        ok = load_settings(make_config(tmp_path, server={"dev_http_loopback": True}))
        assert ok.server.secure_cookies is False

    @pytest.mark.parametrize(
        ("upstream", "expected"),
        [
            (
                {"issuer": "http://idp.example"},
                "upstream.issuer: must be an https URL, got 'http://idp.example'",
            ),
            (
                {"issuer": "http://127.0.0.1:9", "allow_insecure_http_loopback": None},
                "upstream.issuer: plain http needs upstream.allow_insecure_http_loopback = true",
            ),
            (
                {"issuer": "ftp://idp.example"},
                "upstream.issuer: must be an https URL, got 'ftp://idp.example'",
            ),
        ],
    )
    def test_http_issuer(self, tmp_path: Path, upstream: dict[str, Any], expected: str) -> None:
        """An http upstream only on loopback and only with the named setting (DESIGN §5)."""
        path = make_config(tmp_path, upstream=upstream)
        assert _problems(path) == [f"{path}: {expected}"]

    def test_transport_problems_reported_with_others(self, tmp_path: Path) -> None:
        """A transport problem is not hidden by another problem in the same table."""
        path = make_config(
            tmp_path,
            server={"public_url": "http://gw.example", "workerz": 2},
            upstream={"issuer": "http://idp.example", "client_id": None},
        )
        assert sorted(_problems(path)) == sorted(
            [
                f"{path}: server.public_url: plain http is allowed only on a loopback address",
                f"{path}: server.workerz: unknown key",
                f"{path}: upstream.issuer: must be an https URL, got 'http://idp.example'",
                f"{path}: upstream.client_id: required key is missing",
            ]
        )


class TestWorkers:
    def test_memory_store_refused_with_workers(self, tmp_path: Path) -> None:
        """The in-memory store serves one process: workers > 1 needs Redis."""
        path = make_config(tmp_path, server={"workers": 2})
        assert _problems(path) == [
            f"{path}: server.workers: the in-memory store serves one process only; "
            "use a redis:// store with workers > 1"
        ]

    def test_redis_store_with_workers(self, tmp_path: Path) -> None:
        """With a Redis store several workers are fine."""
        settings = load_settings(
            make_config(tmp_path, server={"workers": 4}, store={"url": "redis://127.0.0.1:6379/0"})
        )
        assert settings.server.workers == 4


# --------------------------------------------------------------------------- shipped examples


def _model_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        for sub in _submodels(field.annotation):
            keys.extend(_model_keys(sub, f"{prefix}{name}."))
    return keys


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _submodels(arg)]


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped gateway.toml + policies with its env vars, secret file and key."""
    shutil.copy(REPO / "gateway.toml", tmp_path / "gateway.toml")
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "es256-1.pem").write_bytes(generate_private_key_pem("ES256"))
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "upstream-client-secret").write_text("s3cret\n", "utf-8")
    monkeypatch.setenv("MFAGW_ENCRYPTION_KEY", TEST_ENCRYPTION_KEY)
    monkeypatch.setenv("MFAGW_COOKIE_SECRET", "x" * 43)
    return tmp_path / "gateway.toml"


class TestShippedExamples:
    def test_shipped_gateway_toml_validates(self, shipped: Path) -> None:
        """The shipped gateway.toml is valid with its env vars, secret file and key (CI)."""
        settings = load_settings(shipped)
        assert settings.store.url == "memory://"
        assert settings.server.public_url == "http://127.0.0.1:8080"
        assert settings.upstream.client_secret.get_secret_value() == "s3cret"
        assert settings.keys.signing[0].file == "keys/es256-1.pem"
        assert [r.path for r in settings.resources] == ["/mcp"]

    def test_shipped_gateway_toml_passes_check_config(
        self, shipped: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`mfa-gateway check-config` accepts the shipped file, its key included (CI)."""
        assert main(["check-config", "--config", str(shipped)]) == 0
        assert capsys.readouterr().out == "OK\n"

    def test_shipped_gateway_toml_uses_references_for_secrets(self) -> None:
        """No secret is written literally in the shipped file."""
        raw = tomllib.loads((REPO / "gateway.toml").read_text("utf-8"))
        secrets = [
            raw["store"]["encryption_key"],
            raw["keys"]["cookie_secret"],
            raw["upstream"]["client_secret"],
        ]
        assert all(s.startswith(("env:", "file:")) for s in secrets)

    def test_shipped_gateway_toml_explains_every_key(self) -> None:
        """Every key of the model appears in the shipped file (set or commented) (STYLE §4.3)."""
        text = (REPO / "gateway.toml").read_text("utf-8")
        missing = [
            k
            for k in _model_keys(GatewayFile)
            if f"{k.rsplit('.', 1)[-1]} =" not in text
            and f"[{k}]" not in text
            and f"[[{k}]]" not in text
        ]
        assert missing == []

    def test_shipped_policy_shows_the_defaults(self) -> None:
        """policies/default.toml holds every policy key at its default, plus one example rule."""
        text = (REPO / "policies" / "default.toml").read_text("utf-8")
        raw = tomllib.loads(text)
        policy = Policy.model_validate(raw)
        dumped, defaults = policy.model_dump(), Policy().model_dump()
        assert len(dumped["mcp"].pop("rules")) == 1
        defaults["mcp"].pop("rules")
        assert dumped == defaults
        missing = [
            k
            for k in _model_keys(Policy)
            if f"{k.rsplit('.', 1)[-1]} =" not in text
            and f"[{k}]" not in text
            and f"[[{k}]]" not in text
        ]
        assert missing == []


# --------------------------------------------------------------------------- check-config


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    """Seven deliberate mistakes in two files: `check-config` reports all of them, one per
    line, each naming the file and the dotted key, and exits 1 (DESIGN §5)."""
    path = make_config(
        tmp_path,
        server={"public_url": "http://gw.example", "listn": "x"},
        store={"timeout": "15"},
        upstream={"client_id": None},
        resources=[{"path": "/oauth", "upstream": "http://127.0.0.1:9"}],
        policy={"stepup": {"digits": 9}, "mcp": {"max_body": "1GB"}},
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    policy = f"{tmp_path}/policies/default.toml"
    assert proc.stderr.splitlines() == [
        f"{path}: server.public_url: plain http is allowed only on a loopback address",
        f"{path}: server.listn: unknown key",
        f"{path}: store.timeout: expected a duration like '15m', '12h' or '30s', got '15'",
        f"{path}: upstream.client_id: required key is missing",
        f"{path}: resources[0].path: collides with a gateway path: '/oauth'",
        f"{policy}: stepup.digits: Input should be 6, 7 or 8, got 9",
        f"{policy}: mcp.max_body: expected a size like '64KiB' or '1MiB', got '1GB'",
        "mfa-gateway: 7 configuration problem(s)",
    ]
    assert "Traceback" not in proc.stderr
