-- heartbeat: a node says it is alive, stamped with Redis time (standalone script).
-- KEYS[1] the nodes hash. ARGV: [1] node_id.

local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
return 1
