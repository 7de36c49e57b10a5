"""A first end-to-end pass over the wire (the full suite is in test_wire_*.py)."""

import orjson

from broker.testing import WebSocketClient


async def test_publish_reaches_a_connected_client(port, http_server_client):
    client = await WebSocketClient.connect(port, "/ws/research/s1")
    hello = await client.expect(type="connection_established", session_id="s1", last_seq=0)
    response = await http_server_client.fetch(
        "/api/sessions/s1/events",
        method="POST",
        headers={"Content-Type": "application/json"},
        body=orjson.dumps({"type": "task_started", "task_id": "t1"}),
    )
    assert response.code == 202
    assert orjson.loads(response.body) == {"accepted": 1, "seq": [1]}
    event = await client.expect(type="task_started", task_id="t1", seq=1, epoch=hello["epoch"])
    assert event["session_id"] == "s1"
    client.close()
