-- read_missed: what no connection on any node was sent yet (replay=missed),
-- as far as one connection's filter admits it (common.lua first).
-- KEYS[1..8] session keys. ARGV: [1] the connection's filter echo as JSON ('' = all).
-- Returns {epoch, last_seq, first_seq, entries} like read.lua; what it returns
-- leaves `undelivered` (it is being sent now), what the filter refuses stays.

local epoch = redis.call('HGET', K_META, 'epoch')
if not epoch then
  return {'', 0, 1, {}}
end
local last_seq = tonumber(redis.call('HGET', K_META, 'seq') or '0')
local first = first_seq(last_seq)
redis.call('ZREMRANGEBYSCORE', K_UNDELIVERED, '-inf', '(' .. first)
local filter = {'*'}
if ARGV[1] ~= '' then
  filter = cjson.decode(ARGV[1])
end
local wanted = {}
local lowest = nil
for _, seq in ipairs(redis.call('ZRANGE', K_UNDELIVERED, 0, -1)) do
  wanted[seq .. '-0'] = seq
  lowest = lowest or seq
end
local entries = {}
if lowest then
  for _, entry in ipairs(redis.call('XRANGE', K_STREAM, lowest .. '-0', '+')) do
    local seq = wanted[entry[1]]
    if seq then
      local fields = entry[2]
      local etype = nil
      for i = 1, #fields, 2 do
        if fields[i] == 't' then
          etype = fields[i + 1]
        end
      end
      if etype and admits(filter, etype) then
        entries[#entries + 1] = entry
        redis.call('ZREM', K_UNDELIVERED, seq)
      end
    end
  end
end
return {epoch, last_seq, first, entries}
