-- Returns a CLAIMED item whose lease lapsed to PENDING (the sweeper).
-- ARGV: 4 id
local id = ARGV[4]
local h = load(id)
if not h or tonumber(h.state) ~= 2 then
  redis.call('ZREM', LEASES, id)
  return {'skip'}
end
if tonumber(h.lease_exp) > NOW then
  return {'skip'}
end
redis.call('ZREM', LEASES, id)
redis.call('SREM', qkey(h.queue, 'claimed'), id)
redis.call('ZADD', qkey(h.queue, 'pending'), 0, h.urg)
redis.call('ZADD', qkey(h.queue, 'born'), h.created, id)
redis.call('HDEL', item_key(id), 'lease', 'reviewer', 'lease_exp')
redis.call('HSET', item_key(id), 'state', '1')
redis.call('HINCRBY', item_key(id), 'ver', 1)
audit(id, 4, 'system', {reviewer = h.reviewer})
publish(h.queue, id)
return done(id)
