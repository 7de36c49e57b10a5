-- read: the session's history after a seq, in one consistent snapshot (common.lua first).
-- KEYS[1..8] session keys. ARGV: [1] after_seq.
-- Returns {epoch, last_seq, first_seq, entries}; a missing session is {'', 0, 1, {}}
-- (a read never creates a session).

local epoch = redis.call('HGET', K_META, 'epoch')
if not epoch then
  return {'', 0, 1, {}}
end
local last_seq = tonumber(redis.call('HGET', K_META, 'seq') or '0')
local entries = redis.call('XRANGE', K_STREAM, (tonumber(ARGV[1]) + 1) .. '-0', '+')
return {epoch, last_seq, first_seq(last_seq), entries}
