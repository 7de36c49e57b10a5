-- touch: every key of the session lives session_ttl from now (common.lua first).
-- KEYS[1..8] session keys. ARGV: [1] session_ttl_ms, [2] the node that hears the
-- session's channel, restamped ('' or absent: none; common.lua mark_listener),
-- [3] conn_stale_ms (0 or absent: a mark never goes stale).
-- One call per session instead of a PEXPIRE per key: a node keeps the sessions it
-- holds alive every check, and fewer commands cost its loop less to pack and parse.
-- Returns 1, or 0 when the node's mark was missing or stale before this touch: other
-- nodes' publishes meanwhile may not have been PUBLISHed to it (publish.lua), so
-- it reads the stream for them.

conn_stale_ms = tonumber(ARGV[3]) or 0
local node_id = ARGV[2]
local fresh = 1
if node_id ~= nil and node_id ~= '' and not listener_live(redis.call('HGET', K_LISTENERS, node_id), redis_time_ms()) then
  fresh = 0
end
mark_listener(node_id)
expire_session(ARGV[1])
return fresh
