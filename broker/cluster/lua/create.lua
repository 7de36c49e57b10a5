-- create / ensure: a session's meta with a new epoch if it has none (common.lua first).
-- KEYS[1..8] session keys. ARGV: [1] now_ms ('' = Redis TIME), [2] candidate epoch,
--   [3] session_ttl_ms, [4] the node that now hears the session's channel ('' or
--   absent: none; common.lua mark_listener).
-- Returns {1 if this call (or an earlier try of it, same candidate) created it, epoch}.

local now = clock_ms(ARGV[1])
local existing = redis.call('HGET', K_META, 'epoch')
local created = 0
local epoch = existing
if not existing then
  begin_life(ARGV[2], now)
  epoch = ARGV[2]
  created = 1
elseif existing == ARGV[2] then
  created = 1  -- a retry of a call that did create it
end
mark_listener(ARGV[4])
expire_session(tonumber(ARGV[3]), true)
return {created, epoch}
