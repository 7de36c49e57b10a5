-- touch: every key of the session lives session_ttl from now (common.lua first).
-- KEYS[1..8] session keys. ARGV: [1] session_ttl_ms, [2] the node that hears the
-- session's channel, restamped ('' or absent: none; common.lua mark_listener).
-- One call per session instead of a PEXPIRE per key: a node keeps the sessions it
-- holds alive every check, and fewer commands cost its loop less to pack and parse.

mark_listener(ARGV[2])
expire_session(ARGV[1])
return 1
