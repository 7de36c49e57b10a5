-- unlock_query: release the lock only if `query_id` still holds it (standalone script).
-- KEYS[1] the lock. ARGV: [1] query_id. Returns 1 if it released it.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
