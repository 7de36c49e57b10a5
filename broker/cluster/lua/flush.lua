-- flush: the trailing edge of one task's throttle (common.lua first).
-- KEYS[1..8] session keys, KEYS[9] the global due set.
-- ARGV: [1] now_ms ('' = Redis TIME; tests only), [2] task_id, [3] due member,
--   [4] max_interval_ms, [5] buffer_size, [6] session_ttl_ms, [7] events channel,
--   [8] conn_stale_ms (common.lua; '' or absent: none).
-- Returns {seq or 0, due_ms or 0}: the held event committed now, or, when it
-- is not due yet, the time it will be (the due set then says so too).
-- Idempotent: nothing held (delivered, discarded, flushed already, session
-- gone) does nothing but forget the due entry.

local K_DUE = KEYS[9]
local now = clock_ms(ARGV[1])
local task_id, member = ARGV[2], ARGV[3]
local max_interval = tonumber(ARGV[4])
local buffer_size = tonumber(ARGV[5])
conn_stale_ms = tonumber(ARGV[8]) or 0

local epoch = redis.call('HGET', K_META, 'epoch')
local raw = epoch and redis.call('HGET', K_TASKS, task_id)
if not raw then
  redis.call('ZREM', K_DUE, member)
  return {0, 0}
end
local task = cjson.decode(raw)
if task.held == nil then
  redis.call('ZREM', K_DUE, member)
  return {0, 0}
end
local due = task.last_ms + max_interval
if now < due then  -- max_interval grew since it was held
  redis.call('ZADD', K_DUE, due, member)
  return {0, due}
end
local seq = commit(epoch, task.held, 'task_progress', task_id, task.held_id, buffer_size, true)
task.last_ms, task.progress, task.action = now, task.held_progress, task.held_action
task.held, task.held_id, task.held_progress, task.held_action = nil, nil, nil, nil
redis.call('HSET', K_TASKS, task_id, cjson.encode(task))
redis.call('ZREM', K_DUE, member)
finish_commits(epoch, ARGV[7])
expire_session(tonumber(ARGV[6]))
return {seq, 0}
