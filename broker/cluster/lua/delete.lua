-- delete: every key of the session, its due entries, and a "D <epoch>" payload (common.lua first).
-- KEYS[1..8] session keys, KEYS[9] the global due set, KEYS[10] the query lock.
-- `listeners` stays, to expire: a node that hears the session again at once has
-- just marked itself there, and must not lose the mark to the deletion.
-- ARGV: [1] events channel, [2] due member prefix ("<sid>\n").
-- Returns 1 if the session existed.

local epoch = redis.call('HGET', K_META, 'epoch')
for _, task_id in ipairs(redis.call('HKEYS', K_TASKS)) do
  redis.call('ZREM', KEYS[9], ARGV[2] .. task_id)
end
redis.call('DEL', K_META, K_STREAM, K_DEDUP, K_DEDUPZ, K_TASKS, K_UNDELIVERED, K_CONNS, KEYS[10])
if not epoch then
  return 0
end
redis.call('PUBLISH', ARGV[1], 'D ' .. epoch)
return 1
