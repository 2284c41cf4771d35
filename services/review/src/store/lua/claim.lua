-- Leases the most urgent PENDING item of a queue (or one named PENDING item) to a reviewer.
-- ARGV: 4 queue 5 item_id ('' = the most urgent) 6 lease_id 7 reviewer 8 lease expiry (ms)
--       9 actor
local queue, id = ARGV[4], ARGV[5]
local h
if id == '' then
  local first = redis.call('ZRANGE', qkey(queue, 'pending'), 0, 0)
  if #first == 0 then
    return {'empty'}
  end
  id = string.match(first[1], ':([^:]*)$')
  h = load(id)
  if not h or tonumber(h.state) ~= 1 then
    -- An index entry without its item: drop it so the queue is not stuck behind it.
    redis.call('ZREM', qkey(queue, 'pending'), first[1])
    return {'retry'}
  end
else
  h = load(id)
  if not h then
    return {'not_found'}
  end
  local st = tonumber(h.state)
  if st >= 3 then
    return {'terminal', h.state}
  end
  if st ~= 1 or h.queue ~= queue then
    return {'not_pending'}
  end
end
redis.call('ZREM', qkey(queue, 'pending'), h.urg)
redis.call('ZREM', qkey(queue, 'born'), id)
redis.call('SADD', qkey(queue, 'claimed'), id)
redis.call('ZADD', LEASES, ARGV[8], id)
redis.call('HSET', item_key(id), 'state', '2', 'lease', ARGV[6], 'reviewer', ARGV[7],
  'lease_exp', ARGV[8])
redis.call('HINCRBY', item_key(id), 'ver', 1)
audit(id, 2, ARGV[9], {reviewer = ARGV[7], lease_expire_ms = tonumber(ARGV[8])})
publish(queue, id)
return done(id)
