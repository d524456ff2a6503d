-- Delete a session and everything that names it.
-- KEYS: session hash, transcript, lease, busy, tenant's session zset, recent turns.
-- ARGV: session id, owned-set head, owned-set tail (the owner's set is head .. owner .. tail).
-- Reply: 1 deleted, 0 there was no such session.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
local member = redis.call('HGET', KEYS[1], 'member') or ''
if owner ~= '' then redis.call('SREM', ARGV[2] .. owner .. ARGV[3], ARGV[1]) end
redis.call('ZREM', KEYS[5], member)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6])
return 1
