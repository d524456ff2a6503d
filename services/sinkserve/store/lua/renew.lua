-- Extend an owner's lease while it still holds the session under that epoch.
-- KEYS: session hash, lease. ARGV: owner, epoch, lease ttl ms. Reply: 1 renewed, 0 fenced, -1 gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[2] .. '|' .. ARGV[1], 'PX', ARGV[3])
return 1
