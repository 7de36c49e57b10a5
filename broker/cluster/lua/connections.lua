-- connections: a session's live connections on every node, stale ones dropped (common.lua first).
-- KEYS[1..8] session keys. ARGV: [1] conn_stale_ms (0: every record is live).
-- A record is stale when its node has not rewritten it for conn_stale_ms: the node died.
-- Returns {connection_id, record, ...} of the live ones.

conn_stale_ms = tonumber(ARGV[1]) or 0
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = {}
local all = redis.call('HGETALL', K_CONNS)
for i = 1, #all, 2 do
  if conn_live(all[i + 1], now) then
    live[#live + 1] = all[i]
    live[#live + 1] = all[i + 1]
  else
    redis.call('HDEL', K_CONNS, all[i])
  end
end
return live
