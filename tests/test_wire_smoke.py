"""A first end-to-end pass over the wire (the full suite is in test_wire_*.py)."""

from tests.support.wire import json_of, post_events


async def test_publish_reaches_a_connected_client(connect, http_server_client):
    client, hello = await connect("s1", research=True)
    assert hello["last_seq"] == 0
    response = await post_events(http_server_client, "s1", {"type": "task_started", "task_id": "t1"})
    assert response.code == 202
    assert json_of(response) == {"accepted": 1, "seq": [1]}
    event = await client.expect(type="task_started", task_id="t1", seq=1, epoch=hello["epoch"])
    assert event["session_id"] == "s1"
