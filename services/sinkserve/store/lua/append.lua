-- Append one transcript entry, fenced by owner and epoch, charge the tenant and record the turn, in one step.
-- The charge settles the turn's token reservation (reserve_tokens.lua) in the same step: it is at most what the
-- turn reserved (a rebuild's re-ingest is not the tenant's doing), and the reservation is released.
-- KEYS: session hash, transcript, tenant's tokens-per-minute counter, the session's recent turns,
--       the tenant's reservations hash.
-- ARGV: owner, epoch, blob, tokens, turn increment, tokens to charge the tenant,
--       the turn's record (JSON, '' for none), how many recent turns to keep, the turn id of its reservation ('').
-- Reply: the turn count after it; -1 fenced; -2 the session is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then return -1 end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'tokens_seen', ARGV[4])
local charge = tonumber(ARGV[6])
if ARGV[9] ~= '' then
  local reserved = redis.call('HGET', KEYS[5], ARGV[9])
  if reserved then
    charge = math.min(charge, tonumber(string.sub(reserved, 1, string.find(reserved, '|', 1, true) - 1)))
    redis.call('HDEL', KEYS[5], ARGV[9])
  end
end
if charge > 0 then
  redis.call('INCRBY', KEYS[3], charge)
  redis.call('EXPIRE', KEYS[3], 120)
end
local turns = redis.call('HINCRBY', KEYS[1], 'turns', ARGV[5])
if ARGV[7] ~= '' then
  redis.call('LPUSH', KEYS[4], turns .. '|' .. ARGV[7])
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[8]) - 1)
end
return turns
