"""Shared fixtures: a log on SQLite or on a real PostgreSQL, served over HTTP."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from logserver.app import STATE, LogState, create_app
from logserver.config import Config, load_config

PG_DSN = os.environ.get("LOGSIGN_TEST_PG", "postgresql://root@127.0.0.1:5432/test")
ORIGIN = "test.example/log"


def _postgres_reachable() -> str | None:
    async def probe() -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return repr(exc)
    return None


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The DSN of the test server; in CI an unreachable server fails the run."""
    problem = _postgres_reachable()
    if problem is not None:
        message = f"PostgreSQL at {PG_DSN} is unreachable: {problem}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return PG_DSN


@pytest.fixture
def pg_schema_url(postgres_dsn: str) -> Iterator[str]:
    """A URL with a schema of its own, dropped after the test."""
    schema = "t_" + secrets.token_hex(6)
    sep = "&" if "?" in postgres_dsn else "?"
    yield f"{postgres_dsn}{sep}search_path={schema}"

    async def drop() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'log.db'}"
    url: str = request.getfixturevalue("pg_schema_url")
    return url


@pytest.fixture
def log_config(tmp_path: Path, database_url: str) -> Config:
    return load_config(
        None,
        data=tmp_path / "data",
        database=database_url,
        origin=ORIGIN,
        sequencer={"linger_ms": 0},
    )


@pytest.fixture
async def log_client(
    aiohttp_client: object, log_config: Config
) -> AsyncIterator[TestClient]:
    client: TestClient = await aiohttp_client(create_app(log_config))  # type: ignore[operator]
    yield client


def log_state(client: TestClient) -> LogState:
    return client.app[STATE]


def token_header(client: TestClient) -> dict[str, str]:
    token = log_state(client).token_path.read_text().strip()
    return {"Authorization": f"Bearer {token}"}
