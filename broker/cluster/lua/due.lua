-- due: the held progress whose trailing edge has passed, by Redis time (standalone script).
-- KEYS[1] the global due set. ARGV: [1] now_ms ('' = Redis TIME), [2] limit.
-- Returns members "<sid>\n<task_id>", earliest first.

local now = tonumber(ARGV[1])
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
