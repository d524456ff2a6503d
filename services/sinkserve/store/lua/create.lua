-- Create a session unless it exists or its tenant is at its limit, in one step.
-- KEYS: session hash, tenant's session zset. ARGV: max sessions, zset member, then field/value pairs.
-- Reply: 1 created, 0 tenant at its limit, -1 the session id is taken.
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], 0, ARGV[2])
return 1
