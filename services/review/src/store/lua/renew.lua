-- Extends the current lease.
-- ARGV: 4 id 5 lease_id 6 new expiry (ms) 7 key label
local id = ARGV[4]
local h = load(id)
if not h then
  return {'not_found'}
end
local refused = not_held(h, ARGV[5])
if refused then
  return refused
end
redis.call('HSET', item_key(id), 'lease_exp', ARGV[6])
redis.call('HINCRBY', item_key(id), 'ver', 1)
redis.call('ZADD', LEASES, ARGV[6], id)
audit(id, 3, who(h.reviewer, ARGV[7]), {lease_expire_ms = tonumber(ARGV[6])})
publish(h.queue, id)
return done(id)
