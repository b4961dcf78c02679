"""`open_store` picks the adapter from `[store] url` of a real, validated configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.adapters.factory import open_store
from gateway.adapters.memory_store import MemoryStore
from gateway.adapters.redis_store import RedisStore
from gateway.cli import main
from gateway.clock import FixedClock, SystemClock
from gateway.crypto import generate_encryption_key
from gateway.settings import ConfigError, Settings, load_settings
from tests.fixtures.redis_server import _free_port


def write_config(folder: Path, store_url: str, key_prefix: str = "mfagw:") -> Settings:
    """A minimal valid gateway.toml (with an empty default policy) using `store_url`."""
    (folder / "policies").mkdir(exist_ok=True)
    (folder / "policies" / "default.toml").write_text("", encoding="utf-8")
    config = folder / "gateway.toml"
    config.write_text(
        f"""
[server]
public_url = "http://127.0.0.1:8080"
dev_http_loopback = true

[store]
url = "{store_url}"
key_prefix = "{key_prefix}"
encryption_key = "{generate_encryption_key()}"
timeout = "500ms"

[upstream]
issuer = "https://idp.example.com"
client_id = "gw"
client_secret = "upstream-secret"

[[resources]]
path = "/mcp"
upstream = "http://127.0.0.1:9000/mcp"

[keys]
cookie_secret = "0123456789abcdef0123456789abcdef"
dev_generate = true
""",
        encoding="utf-8",
    )
    return load_settings(config)


async def test_memory_url_gives_memory_store(tmp_path: Path) -> None:
    """`memory://` opens the embedded store on the given clock."""
    clock = FixedClock()
    store = open_store(write_config(tmp_path, "memory://"), clock)
    assert isinstance(store, MemoryStore)
    await store.put_code("h", {"a": 1}, 1.0)
    clock.advance(2.0)
    assert await store.take_code("h") is None


@pytest.mark.redis
async def test_redis_url_gives_redis_store(tmp_path: Path, redis_url: str) -> None:
    """`redis://` opens a RedisStore with the configured prefix, and it works."""
    store = open_store(write_config(tmp_path, redis_url, key_prefix="factory-t:"), SystemClock())
    try:
        assert isinstance(store, RedisStore)
        assert store.key_prefix == "factory-t:"
        await store.ping()
        await store.put_code("h", {"a": 1}, 5.0)
        assert await store.take_code("h") == {"a": 1}
    finally:
        await store.close()


@pytest.mark.parametrize(
    "url",
    [
        "rediss://127.0.0.1:6380/0",
        "unix:///run/redis.sock",
        "redis+sentinel://h:1/svc",
        "redis+cluster://h1:7000,h2:7001/",
    ],
)
async def test_other_redis_schemes_give_redis_store(tmp_path: Path, url: str) -> None:
    """TLS, unix socket, Sentinel and Cluster URLs all open a RedisStore (without connecting
    yet)."""
    store = open_store(write_config(tmp_path, url), SystemClock())
    try:
        assert isinstance(store, RedisStore)
    finally:
        await store.close()


@pytest.mark.redis
async def test_cluster_url_gives_working_store(tmp_path: Path, redis_cluster: Any) -> None:
    """A validated `redis+cluster://` configuration opens a store on the real cluster."""
    settings = write_config(tmp_path, redis_cluster.url, key_prefix="factory-c:")
    store = open_store(settings, SystemClock())
    try:
        assert isinstance(store, RedisStore)
        await store.ping()
        await store.put_code("h", {"a": 1}, 5.0)
        assert await store.take_code("h") == {"a": 1}
    finally:
        await store.close()


def test_unknown_scheme_refused_without_echoing_the_url(tmp_path: Path) -> None:
    """An unsupported store URL is a configuration problem that names the scheme but never
    repeats the URL, which may carry a password (R35)."""
    with pytest.raises(ConfigError) as caught:
        write_config(tmp_path, "mongodb://gw:hunter2secret@db.example:27017/")
    problems = caught.value.problems
    assert any("store.url" in p and "'mongodb'" in p for p in problems), problems
    assert "hunter2secret" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://gw:hunter2secret@127.0.0.1:{p1},127.0.0.1:{p2}/",
        "redis+sentinel://:hunter2secret@127.0.0.1:{p1},127.0.0.1:{p2}/svc",
    ],
)
def test_cli_names_a_multi_host_store_without_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    """With a Cluster or Sentinel store down, the CLI exits 2 naming every host but never the
    password (a several-host URL has no single port to parse; R35)."""
    p1, p2 = _free_port(), _free_port()
    write_config(tmp_path, url.format(p1=p1, p2=p2))
    assert main(["totp", "list", "--config", str(tmp_path / "gateway.toml")]) == 2
    err = capsys.readouterr().err
    scheme = url.split("://", 1)[0]
    assert err.endswith(
        f"the store at {scheme}://127.0.0.1:{p1},127.0.0.1:{p2} is unavailable\n"
    ), err
    assert "hunter2secret" not in err
    assert "Traceback" not in err
