-- publish: one batch of events into one session, atomically (common.lua first).
-- KEYS[1..8] session keys (common.lua), KEYS[9] the global due set, KEYS[10] the query lock.
-- ARGV (few and packed: each argument costs the node's client more than its bytes):
--   [1] now_ms ('' = Redis TIME; tests only), [2] candidate epoch,
--   [3] the limits, space-separated: buffer_size dedup_window_ms min_delta
--       max_interval_ms session_ttl_ms conn_stale_ms (common.lua; 0: none),
--   [4] events channel, [5] due member prefix ("<sid>\n"),
--   [6] a query lock id to release with this batch ('' = none: the batch
--   ends that query, so the next one may start once its end is committed, not before),
--   [7] flags, any of: 'e' to have the payload this call publishes returned too
--       (without it the node has no connection to the session, nobody to hand
--       it to); 'a' when a connection on the calling node admits every type
--       (then no event is `undelivered`, and `conns` need not be read),
--   [8] the calling node's id ('' = always PUBLISH): when no other live node
--       is marked in `listeners` (common.lua mark_listener), nobody else hears
--       the channel, so the payload is not PUBLISHed but returned, and the caller
--       delivers it to its own connections from the reply,
--   [9] the events' fields, a JSON array with one array of 5 strings per event:
--       event_id, type, task_id ('' if none), progress (text, '' if none),
--       current_action ('' for none, else '=' .. text),
--   [10 ..] the events' JSON, in the same order.
-- Returns {seqs (0 = null), held {task_id, due_ms, ...}, throttled, received, now_ms,
--   the payload ('' when nothing was committed, or when it was published and
--   not asked for), 1 if it was PUBLISHed else 0}.
--
-- Why skipping is safe: a node marks itself only once Redis confirmed its
-- SUBSCRIBE, and reads the stream only after marking itself. A publish that
-- runs before the mark is in the stream that node reads; one that runs after
-- it sees the mark and publishes. A node's own connections get the payload
-- from the reply (broker/cluster/node.py), in seq order by the same merge as
-- pub/sub copies. A stale mark costs only a PUBLISH nobody needed.
--
-- Per event, in order, exactly as the memory backend (actors/session.py
-- publish, actors/throttle.py ProgressThrottle, actors/dedup.py):
-- a known event_id answers the seq it got (null while held or discarded) and
-- does nothing else; task_progress goes through the throttle; task_completed /
-- task_failed drop what is held and finish the task; task_started restarts a
-- finished task; everything else is committed.

local K_DUE = KEYS[9]
local now = clock_ms(ARGV[1])
local limits = {}
for value in string.gmatch(ARGV[3], '%S+') do
  limits[#limits + 1] = tonumber(value)
end
local buffer_size, dedup_window, min_delta, max_interval, ttl = unpack(limits, 1, 5)
conn_stale_ms = limits[6] or 0
local channel = ARGV[4]
local due_prefix = ARGV[5]
local release_query = ARGV[6]
local echo = string.find(ARGV[7], 'e', 1, true) ~= nil
if string.find(ARGV[7], 'a', 1, true) then
  conn_filters = {{'*'}}  -- anyone_admits: someone does, whatever the other nodes' records say
end
local origin = ARGV[8]
local fields = cjson.decode(ARGV[9])
local n = #fields

local epoch, exp_ms = session_epoch(ARGV[2], now)

-- Forget event ids accepted before the window (actors/dedup.py forget_before).
local horizon = '(' .. (now - dedup_window)
local old = redis.call('ZRANGEBYSCORE', K_DEDUPZ, '-inf', horizon)
if #old > 0 then
  for i = 1, #old, 500 do
    redis.call('HDEL', K_DEDUP, unpack(old, i, math.min(i + 499, #old)))
  end
  redis.call('ZREMRANGEBYSCORE', K_DEDUPZ, '-inf', horizon)
  if redis.call('EXISTS', K_DEDUPZ) == 0 then
    keys_created = true  -- emptied: this call's new event ids make both dedup keys again
  end
end

-- Renewing every key's expiry is seven PEXPIREs, a third of a single-event
-- publish's commands. So a publish renews only when the deadline its session's
-- keys were last given (meta `exp_ms`, Redis time) is less than session_ttl away,
-- and then to session_ttl plus a slack (a tenth of it, a minute at most): a
-- session that publishes steadily renews once per slack, and lives between
-- session_ttl and session_ttl + slack after its last event. A call that may
-- have made a key renews at once, since a key without expiry would outlive
-- its session. The deadline is real Redis time even under a test's clock.
local function renew_session(force)
  if force or exp_ms == nil or exp_ms - redis_time_ms() < ttl then
    expire_session(ttl + math.min(math.floor(ttl / 10), 60000))  -- records the new deadline
  end
  redis.call('HSET', K_META, 'last_event_ms', now)
end

local throttled = 0
local received = 0
local held_tasks = {}  -- task_id -> due_ms of what this call newly held
local held_order = {}

-- Task state, read once per task and written back at the end:
-- {last_ms, progress (text), action, finished, held (event JSON), held_id,
--  held_progress, held_action}; {} is a task with nothing delivered yet.
local tasks = {}
local dirty = {}
local function task_of(task_id)
  local task = tasks[task_id]
  if task == nil then
    local raw = redis.call('HGET', K_TASKS, task_id)
    if raw then
      task = cjson.decode(raw)
    else
      task = {}
    end
    tasks[task_id] = task
  end
  dirty[task_id] = true
  return task
end

-- Whatever was held for the task will never be delivered: count it, drop it.
local function drop_held(task, task_id)
  if task.held ~= nil then
    throttled = throttled + 1
    task.held, task.held_id, task.held_progress, task.held_action = nil, nil, nil, nil
    redis.call('ZREM', K_DUE, due_prefix .. task_id)
    if held_tasks[task_id] ~= nil then
      held_tasks[task_id] = false
    end
  end
end

-- The event carries news worth sending now (ProgressThrottle._wanted).
local function wanted(task, progress, action)
  return task.last_ms == nil
    or progress == 0 or progress == 100
    or math.abs(progress - tonumber(task.progress)) >= min_delta
    or action ~= task.action
end

local function offer(task_id, event_id, progress_text, action, json)
  local task = task_of(task_id)
  if task.finished then
    throttled = throttled + 1
    return 0
  end
  if wanted(task, tonumber(progress_text), action) then
    drop_held(task, task_id)
    task.last_ms, task.progress, task.action = now, progress_text, action
    return commit(epoch, json, 'task_progress', task_id, event_id, buffer_size, false)
  end
  if task.held ~= nil then
    throttled = throttled + 1  -- superseded while held
  else
    local due = math.max(now, task.last_ms + max_interval)
    redis.call('ZADD', K_DUE, due, due_prefix .. task_id)
    if held_tasks[task_id] == nil then
      held_order[#held_order + 1] = task_id
    end
    held_tasks[task_id] = due
  end
  task.held, task.held_id, task.held_progress, task.held_action = json, event_id, progress_text, action
  return 0
end

local seqs = {}
for i = 1, n do
  local event = fields[i]
  local event_id, etype, task_id = event[1], event[2], event[3]
  local prior = redis.call('HGET', K_DEDUP, event_id)
  local seq = 0
  if prior then
    if prior ~= '' then
      seq = tonumber(prior)
    end
  else
    received = received + 1
    redis.call('ZADD', K_DEDUPZ, now, event_id)
    local json = ARGV[9 + i]
    if etype == 'task_progress' then
      local action = event[5]
      if action == '' then
        action = nil
      else
        action = string.sub(action, 2)
      end
      seq = offer(task_id, event_id, event[4], action, json)
    else
      if etype == 'task_completed' or etype == 'task_failed' then
        local task = task_of(task_id)
        drop_held(task, task_id)
        task.finished = true
      elseif etype == 'task_started' then
        local task = tasks[task_id]
        if task == nil then
          local raw = redis.call('HGET', K_TASKS, task_id)
          if raw then
            task = cjson.decode(raw)
            tasks[task_id] = task
          end
        end
        if task ~= nil and task.finished then
          tasks[task_id] = {}  -- afresh: its next progress is "first"
          dirty[task_id] = true
        end
      end
      seq = commit(epoch, json, etype, '', event_id, buffer_size, false)
    end
    if seq == 0 then  -- held or discarded: known, with no seq (a commit wrote its seq itself)
      redis.call('HSET', K_DEDUP, event_id, '')
    end
  end
  seqs[#seqs + 1] = seq
end

for task_id in pairs(dirty) do
  local task = tasks[task_id]
  if next(task) == nil then
    redis.call('HDEL', K_TASKS, task_id)
  elseif redis.call('HSET', K_TASKS, task_id, cjson.encode(task)) == 1 then
    keys_created = true  -- a new task: the first one makes the key
  end
end

local held = {}
for _, task_id in ipairs(held_order) do
  if held_tasks[task_id] then
    held[#held + 1] = task_id
    held[#held + 1] = held_tasks[task_id]
  end
end

if throttled > 0 then
  redis.call('HINCRBY', K_META, 'throttled', throttled)
end
-- Whether a live node other than the caller hears the session's channel;
-- stale marks (their node stopped restamping them: it died) are dropped.
local function heard_elsewhere()
  if origin == '' then
    return true
  end
  local stamp_now = redis_time_ms()  -- marks are Redis time, even under a test's injected clock
  local marks = redis.call('HGETALL', K_LISTENERS)
  local heard = false
  for i = 1, #marks, 2 do
    if marks[i] ~= origin then
      if listener_live(marks[i + 1], stamp_now) then
        heard = true
      else
        redis.call('HDEL', K_LISTENERS, marks[i])
      end
    end
  end
  return heard
end

local published = 0
if #lines > 0 and heard_elsewhere() then
  published = 1
end
local payload = finish_commits(epoch, channel, published == 0)
renew_session(keys_created)
if release_query ~= '' and KEYS[10] and redis.call('GET', KEYS[10]) == release_query then
  redis.call('DEL', KEYS[10])
end
if published == 1 and not echo then
  payload = ''
end
return {seqs, held, throttled, received, now, payload, published}
