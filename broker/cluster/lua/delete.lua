-- delete: every key of the session, its due entries, and a "D <epoch>" payload (common.lua first).
-- KEYS[1..7] session keys, KEYS[8] the global due set, KEYS[9] the query lock.
-- ARGV: [1] events channel, [2] due member prefix ("<sid>\n").
-- Returns 1 if the session existed.

local epoch = redis.call('HGET', K_META, 'epoch')
for _, task_id in ipairs(redis.call('HKEYS', K_TASKS)) do
  redis.call('ZREM', KEYS[8], ARGV[2] .. task_id)
end
redis.call('DEL', K_META, K_STREAM, K_DEDUP, K_DEDUPZ, K_TASKS, K_UNDELIVERED, K_CONNS, KEYS[9])
if not epoch then
  return 0
end
redis.call('PUBLISH', ARGV[1], 'D ' .. epoch)
return 1
