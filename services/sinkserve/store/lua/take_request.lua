-- One request from the tenant's token bucket (rate tokens a second, at most burst), refilled lazily.
-- KEYS: the tenant's bucket hash. ARGV: rate (tokens/s), burst.
-- Reply: {1 allowed | 0 refused, ms until a token is there (0 when allowed)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ms')
local tokens, last = tonumber(state[1]), tonumber(state[2])
if tokens == nil or last == nil then tokens, last = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - last) * rate / 1000)
local allowed, wait = 0, 0
if tokens >= 1 then
  tokens, allowed = tokens - 1, 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ms', string.format('%.3f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
