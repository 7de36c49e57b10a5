-- lock_query: the one-query-at-a-time lock of a session (standalone script).
-- KEYS[1] the lock. ARGV: [1] query_id, [2] ttl_ms.
-- Returns 1 if `query_id` holds the lock now (taken, or already its own: a retried call).

local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
