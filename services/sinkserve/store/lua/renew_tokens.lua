-- Extend a turn's token reservation (see reserve_tokens.lua) while its turn runs.
-- KEYS: the tenant's reservations hash. ARGV: turn id, lease ms. Reply: 1 renewed, 0 no such reservation.
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sep = string.find(value, '|', 1, true)
redis.call('HSET', KEYS[1], ARGV[1], string.sub(value, 1, sep - 1) .. '|' .. (now + tonumber(ARGV[2])))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
