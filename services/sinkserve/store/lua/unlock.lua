-- Release a turn lock only if this turn still holds it (a lapsed lock may belong to the next turn now).
-- KEYS: busy lock. ARGV: turn id. Reply: 1 released, 0 not ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
