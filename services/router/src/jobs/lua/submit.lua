-- Queues a new job, or returns the one submitted with the same request_id.
-- ARGV: 4 id  5 request_id ('' = none)  6 body  7 expire (Unix ms)  8 capacity
--       9 request_id retention (ms)  10 '1' when the job has a callback, else '0'
local id, rid = ARGV[4], ARGV[5]
local rkey = BASE .. ':_req:' .. rid
if rid ~= '' then
  local existing = redis.call('GET', rkey)
  if existing then
    local h = redis.call('HGETALL', job_key(existing))
    if #h > 0 then
      return {'exists', h}
    end
  end
end
if tonumber(redis.call('GET', OPEN) or '0') >= tonumber(ARGV[8]) then
  return {'full'}
end
if rid ~= '' then
  redis.call('SET', rkey, id, 'PX', ARGV[9])
end
redis.pcall('XGROUP', 'CREATE', STREAM, GROUP, '0', 'MKSTREAM')
local seq = redis.call('INCR', BASE .. ':_seq')
redis.call('HSET', job_key(id), 'id', id, 'state', '1', 'attempts', '0', 'body', ARGV[6],
  'created', fmt(NOW), 'expire', ARGV[7], 'seq', fmt(seq), 'cb', ARGV[10])
redis.call('ZADD', BASE .. ':_index', seq, id)
redis.call('INCR', OPEN)
local entry = redis.call('XADD', STREAM, '*', 'tenant', TENANT, 'id', id)
redis.call('HSET', job_key(id), 'entry', entry)
publish(id)
return done(id)
