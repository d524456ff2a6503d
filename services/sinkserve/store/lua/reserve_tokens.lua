-- Reserve a turn's worst case against the tenant's tokens per minute, atomically with the check:
-- refused when used + reserved + worst > limit. Reservations are "tokens|expiry ms" entries that the turn's
-- gateway renews; an expired one (its gateway died) is dropped here and counts no more.
-- KEYS: this minute's tokens-per-minute counter, the tenant's reservations hash.
-- ARGV: turn id, worst-case tokens, limit, lease ms.
-- Reply: {1 reserved | 0 refused, tokens used this minute, tokens reserved by other turns}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local reserved = 0
local entries = redis.call('HGETALL', KEYS[2])
for i = 1, #entries, 2 do
  local value = entries[i + 1]
  local sep = string.find(value, '|', 1, true)
  local amount = tonumber(string.sub(value, 1, sep - 1))
  if tonumber(string.sub(value, sep + 1)) <= now then
    redis.call('HDEL', KEYS[2], entries[i])
  elseif entries[i] ~= ARGV[1] then
    reserved = reserved + amount
  end
end
local worst, lease = tonumber(ARGV[2]), tonumber(ARGV[4])
if used + reserved + worst > tonumber(ARGV[3]) then return {0, used, reserved} end
redis.call('HSET', KEYS[2], ARGV[1], worst .. '|' .. (now + lease))
if redis.call('PTTL', KEYS[2]) < lease then redis.call('PEXPIRE', KEYS[2], lease) end
return {1, used, reserved}
