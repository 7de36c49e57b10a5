-- put_connection: register or refresh connections of one session (standalone script).
-- KEYS[1] the session's conns hash. ARGV: [1] session_ttl_ms, then pairs: connection_id,
-- its record (a JSON object without `seen_ms`).
-- Each record is stored stamped with Redis time in front, '{"seen_ms":<ms>,...}', so
-- every node judges staleness (common.lua conn_live) by one clock, not its own.
-- One call per session and check, not per connection: a node's refresh of 1 000
-- connections is then ~100 calls, which redis-py packs without holding its loop.
-- Returns the stamp.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stamp = '{"seen_ms":' .. now
local fields = {}
for i = 2, #ARGV, 2 do
  local rest = string.sub(ARGV[i + 1], 2)
  if rest ~= '}' then
    rest = ',' .. rest
  end
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = stamp .. rest
end
if #fields > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return now
