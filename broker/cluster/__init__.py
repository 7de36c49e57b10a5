"""The Redis backend (docs/protocol.md section 7): the only package that talks to Redis.

`store.RedisStore` holds what nodes share (history, seq/epoch, dedup,
throttle, connections, locks); `subscriber.Subscriber` carries the fan-out.
"""
