-- Make ARGV[2] the owner if the epoch is still the expected one; bumping the epoch fences the old owner.
-- KEYS: session hash, lease, the new owner's owned set.
-- ARGV: expected epoch, new owner, lease ttl ms, session id, owned-set head, owned-set tail
--       (an owner's owned set is head .. owner .. tail: Keys.replica_owned).
-- Reply: {epoch, owner} after the call; {-1, ''} if the session is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if epoch ~= tonumber(ARGV[1]) then return {epoch, owner} end
epoch = epoch + 1
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'epoch', epoch)
redis.call('SET', KEYS[2], epoch .. '|' .. ARGV[2], 'PX', ARGV[3])
if owner ~= '' then redis.call('SREM', ARGV[5] .. owner .. ARGV[6], ARGV[4]) end
redis.call('SADD', KEYS[3], ARGV[4])
return {epoch, ARGV[2]}
