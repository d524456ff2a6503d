-- KEYS: session hash, transcript. ARGV: head tokens, tail tokens (4 bytes per token in an entry).
-- Reads entries from the front until `head` tokens and from the back until `tail` tokens, never the middle
-- of a long log. Reply: {total tokens, head entries..., tail entries...}.
local n = redis.call('LLEN', KEYS[2])
local want_head, want_tail = tonumber(ARGV[1]), tonumber(ARGV[2])
local out, head_tokens, i = {}, 0, 0
while i < n and head_tokens < want_head do
  local blob = redis.call('LINDEX', KEYS[2], i)
  out[#out + 1] = blob
  head_tokens = head_tokens + #blob / 4
  i = i + 1
end
local tail, tail_tokens, j = {}, 0, n - 1
while j >= i and tail_tokens < want_tail do
  local blob = redis.call('LINDEX', KEYS[2], j)
  tail[#tail + 1] = blob
  tail_tokens = tail_tokens + #blob / 4
  j = j - 1
end
for k = #tail, 1, -1 do out[#out + 1] = tail[k] end
local total = head_tokens + tail_tokens
if j >= i then total = tonumber(redis.call('HGET', KEYS[1], 'tokens_seen') or '0') end  -- entries skipped
table.insert(out, 1, total)
return out
