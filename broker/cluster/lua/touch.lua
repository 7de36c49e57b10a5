-- touch: every key of the session lives session_ttl from now (common.lua first).
-- KEYS[1..7] session keys. ARGV: [1] session_ttl_ms.
-- One call per session instead of a PEXPIRE per key: a node keeps the sessions it
-- holds alive every check, and fewer commands cost its loop less to pack and parse.

expire_session(ARGV[1])
return 1
