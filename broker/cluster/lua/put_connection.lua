-- put_connection: register or refresh one connection of a session (standalone script).
-- KEYS[1] the session's conns hash. ARGV: [1] connection_id, [2] its record (a JSON
-- object without `seen_ms`), [3] session_ttl_ms.
-- The record is stored stamped with Redis time in front, '{"seen_ms":<ms>,...}', so
-- every node judges staleness (common.lua conn_live) by one clock, not its own.
-- Returns the stamp.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rest = string.sub(ARGV[2], 2)
if rest ~= '}' then
  rest = ',' .. rest
end
redis.call('HSET', KEYS[1], ARGV[1], '{"seen_ms":' .. now .. rest)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return now
