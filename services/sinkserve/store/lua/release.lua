-- Give a session up (drain): no owner, no lease; the epoch stays, so the next claim expects it.
-- KEYS: session hash, lease, the owner's owned set. ARGV: owner, epoch, session id. Reply: 1 released, 0 not ours.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'owner', '')
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[3])
return 1
