"""WebSocket tokens: handshake rules over the wire, expiry and refresh under the harness."""

from __future__ import annotations

import time
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from actors.filters import ALL
from actors.messages import ClientMessage
from broker.config import Settings
from broker.core import Broker
from broker.testing import RecordingTransport
from tests.support.wire import Clients, post_json

SECRET = "test-secret-of-a-decent-length-0123456789"


def mint(key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    base = {"sub": "u1", "sessions": ["s1"], "exp": int(time.time()) + 600}
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, key, algorithm=algorithm)


@pytest.fixture
def settings():
    return Settings(jwt_secret=SECRET)


async def refused(
    connect: Clients, path: str = "/ws/research/s1", **params: Any
) -> tuple[int | None, str | None, list[Any]]:
    client = await connect.plain(path=path, **params)
    code, reason = await client.closed()
    return code, reason, client.received


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "a token is required"),
        ("not-a-jwt", "invalid token"),
        (mint(key="another-secret-of-a-decent-length-012345"), "invalid token"),
        (mint(exp=int(time.time()) - 5), "token expired"),
        (mint(sub=None), "malformed token: no 'sub' claim"),
        (mint(sessions=None), "malformed token: no 'sessions' claim"),
        (mint(exp=None), "malformed token: no 'exp' claim"),
        (mint(sessions="s1"), "malformed token: 'sessions' must be a list of ids or \"*\""),
    ],
    ids=["absent", "garbage", "bad-signature", "expired", "no-sub", "no-sessions", "no-exp", "sessions-string"],
)
async def test_bad_tokens_close_4001_before_any_data(connect, token, reason):
    assert await refused(connect, token=token) == (4001, reason, [])


async def test_a_token_for_another_session_closes_4003(connect):
    assert await refused(connect, token=mint(sessions=["s2"])) == (4003, "token does not cover this session", [])


async def test_a_user_id_that_disagrees_with_sub_closes_4003(connect):
    code, reason, received = await refused(connect, "/ws", session_id="s1", user_id="u2", token=mint())
    assert (code, reason, received) == (4003, "token names another user", [])


async def test_a_valid_token_connects_and_sub_becomes_the_user(connect):
    _, greeting = await connect("s1", token=mint())
    assert greeting["user_id"] == "u1"


async def test_a_wildcard_token_covers_every_session(connect):
    await connect("anything", research=True, token=mint(sessions="*"))


async def test_browsers_can_send_the_token_as_a_subprotocol(port):
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    request = HTTPRequest(f"ws://127.0.0.1:{port}/ws/research/s1")
    conn = await websocket_connect(request, subprotocols=["bearer", mint()])
    assert conn.selected_subprotocol == "bearer"
    assert orjson.loads(await conn.read_message())["type"] == "connection_established"
    conn.close()


async def test_a_token_that_expires_while_connected_closes_4001(connect):
    client, _ = await connect("s1", research=True, token=mint(exp=int(time.time()) + 2), timeout=6)
    assert await client.closed() == (4001, "token expired")


async def test_research_start_hands_out_a_token_that_works(connect, http_server_client):
    code, answer = await post_json(http_server_client, "/api/research/start", {"query": "q", "user_id": "alice"})
    assert code == 201, answer
    claims = jwt.decode(answer["token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["sessions"] == [answer["session_id"]]
    _, greeting = await connect(answer["session_id"], research=True, token=answer["token"])
    assert greeting["user_id"] == "alice"


class TestPublicKey:
    """ES256 with jwt_public_key: the broker verifies, only the backend can sign."""

    key = ec.generate_private_key(ec.SECP256R1())

    @pytest.fixture
    def settings(self):
        public = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return Settings(jwt_public_key=public.decode())

    async def test_a_token_signed_with_the_private_key_connects(self, connect):
        await connect("s1", research=True, token=mint(self.key, "ES256"))

    async def test_an_hs256_token_is_refused(self, connect):
        code, _, received = await refused(connect, token=mint())
        assert (code, received) == (4001, [])


# -- expiry and refresh under the manual clock ------------------------------------


def connect_with_token(harness: Any, broker: Broker, expires_at: float) -> tuple[Any, RecordingTransport]:
    transport = RecordingTransport()

    def refresh(token: str) -> float:
        try:
            return broker.tokens.verify(token, "s1", "u1").expires_at
        except Exception as exc:
            raise ValueError(str(exc)) from exc

    ref = broker.open_connection(
        session_id="s1",
        user_id="u1",
        event_filter=ALL,
        replay="none",
        last_seq=None,
        epoch=None,
        greeting_type="connected",
        transport=transport,
        expires_at=expires_at,
        refresh=refresh,
    ).ref
    harness.run_until_idle()
    return ref, transport


def test_refresh_before_exp_keeps_the_connection_open(harness):
    broker = Broker(Settings(jwt_secret=SECRET))
    now = harness.clock.time()
    ref, transport = connect_with_token(harness, broker, now + 60)
    harness.advance(50)
    new_exp = int(time.time()) + 3600  # PyJWT checks exp against the real clock
    ref.tell(ClientMessage(orjson.dumps({"type": "refresh", "token": mint(exp=new_exp)}).decode()))
    harness.run_until_idle()
    assert transport.messages[-1]["type"] == "refreshed"
    assert transport.messages[-1]["exp"] == new_exp
    harness.advance(20)  # past the first token's exp
    assert transport.closed is None


def test_without_refresh_the_connection_closes_at_exp(harness):
    broker = Broker(Settings(jwt_secret=SECRET))
    _, transport = connect_with_token(harness, broker, harness.clock.time() + 60)
    harness.advance(59.9)
    assert transport.closed is None
    harness.advance(0.1)
    assert transport.closed == (4001, "token expired")


@pytest.mark.parametrize(
    "token",
    [mint(sessions=["other"]), mint(sub="mallory"), "garbage", mint(key="wrong-secret-of-a-decent-length-0123456")],
    ids=["other-session", "other-user", "garbage", "bad-signature"],
)
def test_a_bad_refresh_is_bad_token_and_changes_nothing(harness, token):
    broker = Broker(Settings(jwt_secret=SECRET))
    ref, transport = connect_with_token(harness, broker, harness.clock.time() + 60)
    ref.tell(ClientMessage(orjson.dumps({"type": "refresh", "token": token}).decode()))
    harness.run_until_idle()
    assert transport.messages[-1]["type"] == "error"
    assert transport.messages[-1]["code"] == "bad_token"
    harness.advance(60)
    assert transport.closed == (4001, "token expired")
