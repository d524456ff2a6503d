-- Extend a turn lock's lease only while this turn still holds it (a stale holder never extends another's).
-- KEYS: busy lock. ARGV: turn id, lease ms. Reply: 1 renewed, 0 not ours (lapsed or taken).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
