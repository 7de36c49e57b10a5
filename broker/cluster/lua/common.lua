-- Shared by every session script: broker/cluster/store.py prepends this file
-- to each of them before SCRIPT LOAD (Redis scripts cannot include files).
--
-- KEYS[1..8] of every session script, all with the session's hash tag:
--   meta, stream, dedup, dedupz, tasks, undelivered, conns, listeners
-- (layout: broker/cluster/store.py module docstring). Extra keys follow at 9+.

local K_META, K_STREAM, K_DEDUP, K_DEDUPZ = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_TASKS, K_UNDELIVERED, K_CONNS, K_LISTENERS = KEYS[5], KEYS[6], KEYS[7], KEYS[8]

-- The cluster's one clock: Redis TIME in ms, so nodes' clock skew never
-- changes a throttle or dedup decision. A non-empty `override` is a test's
-- injected time; production calls always pass ''.
-- Redis TIME in ms, read once per call (clock_ms and anyone_admits share it).
local redis_now = nil
local function redis_time_ms()
  if redis_now == nil then
    local t = redis.call('TIME')
    redis_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return redis_now
end

local function clock_ms(override)
  if override ~= nil and override ~= '' then
    return tonumber(override)
  end
  return redis_time_ms()
end

-- Every key of the session lives `ttl_ms` from now, exactly. Meta (if the
-- session exists) keeps that deadline as `exp_ms`, in Redis time, so that a
-- publish can tell whether its own renewal is due (publish.lua renew_session).
-- `unrecorded`: the session may still lack keys its next publish makes (it was
-- just created, without events): that publish must renew, whatever the deadline.
local function expire_session(ttl_ms, unrecorded)
  ttl_ms = tonumber(ttl_ms)
  local live = redis.call('PEXPIRE', K_META, ttl_ms) == 1
  for i = 2, 8 do
    redis.call('PEXPIRE', KEYS[i], ttl_ms)
  end
  if live and unrecorded then
    redis.call('HDEL', K_META, 'exp_ms')
  elseif live then
    redis.call('HSET', K_META, 'exp_ms', redis_time_ms() + ttl_ms)
  end
end

-- Node `node_id` hears the session's channel (its subscription is confirmed):
-- from now on a publish from any other node must PUBLISH (publish.lua). Stamped
-- with Redis time; the node restamps it every check, and a stamp older than
-- conn_stale_ms is a dead node's (publish.lua drops it). Written before the
-- session's keys are given their expiry, so the key gets one too.
local function mark_listener(node_id)
  if node_id ~= nil and node_id ~= '' then
    redis.call('HSET', K_LISTENERS, node_id, redis_time_ms())
  end
end

-- A session's life begins (it had no meta). Keys an earlier life left behind
-- (expiry removes keys one by one, so one may outlive meta by a moment) are
-- dropped so seqs restart at 1 and no old event_id answers. `conns` and
-- `listeners` stay: they are the nodes' registries, not history.
local function begin_life(epoch, now)
  redis.call('DEL', K_STREAM, K_DEDUP, K_DEDUPZ, K_TASKS, K_UNDELIVERED)
  redis.call('HSET', K_META, 'epoch', epoch, 'seq', 0, 'created_ms', now, 'throttled', 0)
end

-- The session's epoch, creating the session with `candidate` if it has none;
-- then the deadline its keys were last given (expire_session; nil for a new one).
local function session_epoch(candidate, now)
  local meta = redis.call('HMGET', K_META, 'epoch', 'exp_ms')
  if meta[1] then
    return meta[1], tonumber(meta[2])
  end
  begin_life(candidate, now)
  return candidate, nil
end

-- A connection's filter echo admits `etype` (docs/protocol.md section 3.4):
-- {'*'} everything, {'*', '-a', ...} everything but those, else the listed types.
local function admits(filter, etype)
  if filter[1] == '*' then
    local excluded = '-' .. etype
    for i = 2, #filter do
      if filter[i] == excluded then
        return false
      end
    end
    return true
  end
  for i = 1, #filter do
    if filter[i] == etype then
      return true
    end
  end
  return false
end

-- A connection record (put_connection.lua) begins with the Redis time it was
-- last written: '{"seen_ms":<ms>,...'. Its node rewrites it every
-- backend_check_interval; one not rewritten for `conn_stale_ms` belongs to a
-- node that died (kill -9): it admits nothing and is forgotten. A record
-- without the stamp (written before it existed) never goes stale.
-- `conn_stale_ms` is set by the script (0: nothing is stale).
local conn_stale_ms = 0
local function conn_live(raw, now)
  if conn_stale_ms <= 0 then
    return true
  end
  local seen = tonumber(string.match(raw, '^{"seen_ms":(%d+)'))
  return seen == nil or seen >= now - conn_stale_ms
end

-- A node's mark in `listeners` (mark_listener, or nil when it has none) is live
-- under its connection records' rule: restamped within conn_stale_ms.
local function listener_live(stamp, now)
  stamp = tonumber(stamp)
  return stamp ~= nil and (conn_stale_ms <= 0 or stamp >= now - conn_stale_ms)
end

-- Whether some live connection of the session, on any node, admits `etype`
-- (decides `undelivered`, i.e. replay=missed). `conns` is read once per call;
-- stale records are dropped on the way.
local conn_filters = nil
local admitted = {}
-- The filter echo of a connection that takes every event, as the node writes it
-- (orjson; a string value holds `"` only escaped, so this text is the key's own):
-- such a record admits everything without being decoded.
local ADMITS_ALL = '"events":["*"]'
local function anyone_admits(etype)
  local known = admitted[etype]
  if known ~= nil then
    return known
  end
  if conn_filters == nil then
    conn_filters = {}
    local now = redis_time_ms()  -- the records' stamps are Redis time, even under a test's injected clock
    local all = redis.call('HGETALL', K_CONNS)
    for i = 1, #all, 2 do
      local raw = all[i + 1]
      if not conn_live(raw, now) then
        redis.call('HDEL', K_CONNS, all[i])
      elseif string.find(raw, ADMITS_ALL, 1, true) then
        conn_filters[#conn_filters + 1] = {'*'}
      else
        local ok, info = pcall(cjson.decode, raw)
        if ok and type(info) == 'table' and type(info.events) == 'table' then
          conn_filters[#conn_filters + 1] = info.events
        end
      end
    end
  end
  local yes = false
  for _, filter in ipairs(conn_filters) do
    if admits(filter, etype) then
      yes = true
      break
    end
  end
  admitted[etype] = yes
  return yes
end

-- The payload lines of this call's commits: one PUBLISH per call.
local lines = {}

-- This call may have created a key of the session (its first commit made the
-- stream, an `undelivered` entry that set): publish.lua then renews at once.
local keys_created = false
-- This call marked a seq `undelivered`: finish_commits trims the set to the stream.
local added_undelivered = false

-- Give one event its seq and keep it: HINCRBY seq, XADD with id <seq>-0 and
-- an exact MAXLEN, `undelivered` when no connection admits it, the dedup
-- record (`only_if_known`: a flushed event's id may have left the window).
-- `event_json` is a non-empty JSON object; the message is it plus seq and epoch.
local function commit(epoch, event_json, etype, task_key, event_id, buffer_size, only_if_known)
  local seq = redis.call('HINCRBY', K_META, 'seq', 1)
  local message = string.sub(event_json, 1, -2) .. ',"seq":' .. seq .. ',"epoch":"' .. epoch .. '"}'
  redis.call('XADD', K_STREAM, 'MAXLEN', '=', buffer_size, seq .. '-0', 'm', message, 't', etype, 'k', task_key)
  if not anyone_admits(etype) then
    redis.call('ZADD', K_UNDELIVERED, seq, seq)
    keys_created = true
    added_undelivered = true
  end
  if seq == 1 then
    keys_created = true  -- the stream's first entry
  end
  if (not only_if_known) or redis.call('HEXISTS', K_DEDUP, event_id) == 1 then
    redis.call('HSET', K_DEDUP, event_id, seq)
  end
  -- The payload's task field is the raw task_id, except one holding a tab or a
  -- newline (the payload's separators): that one is sent empty (the stream's
  -- `k` keeps it exact); a progress frame without task_id is only never compacted.
  local task_field = task_key
  if string.find(task_key, '[\t\n]') then
    task_field = ''
  end
  lines[#lines + 1] = seq .. '\t' .. etype .. '\t' .. task_field .. '\t' .. message
  return seq
end

-- After the commits of a call: forget `undelivered` seqs the stream trimmed,
-- then announce the whole call in one payload: "E <epoch>" and a line per message,
-- unless `unheard` (no node but the caller hears the channel, publish.lua).
-- Returns that payload ('' when nothing was committed).
local function finish_commits(epoch, channel, unheard)
  if #lines == 0 then
    return ''
  end
  if added_undelivered then
    -- Only a call that added to the set trims it: then it never holds more than the
    -- stream's seqs and one batch, and a call that added nothing (the usual one: some
    -- connection takes everything) spends no command on it. read_missed trims too.
    local first = redis.call('XRANGE', K_STREAM, '-', '+', 'COUNT', 1)
    if first[1] then
      local first_seq = string.match(first[1][1], '^(%d+)')
      redis.call('ZREMRANGEBYSCORE', K_UNDELIVERED, '-inf', '(' .. first_seq)
    end
  end
  local payload = 'E ' .. epoch .. '\n' .. table.concat(lines, '\n')
  if not unheard then
    redis.call('PUBLISH', channel, payload)
  end
  return payload
end

-- The first seq still in the stream (last_seq + 1 when it is empty).
local function first_seq(last_seq)
  local first = redis.call('XRANGE', K_STREAM, '-', '+', 'COUNT', 1)
  if first[1] then
    return tonumber(string.match(first[1][1], '^(%d+)'))
  end
  return last_seq + 1
end
