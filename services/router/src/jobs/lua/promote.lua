-- Delivers the jobs whose retry backoff is over, of both queues (ARGV 2, the tenant, is unused).
-- ARGV: 4 most to move per queue
for _, q in ipairs({'async', 'batch'}) do
  use_queue(q)
  local due = redis.call('ZRANGEBYSCORE', DELAYED, '-inf', fmt(NOW), 'LIMIT', 0, tonumber(ARGV[4]))
  for _, member in ipairs(due) do
    redis.call('ZREM', DELAYED, member)
    local tenant, id = string.match(member, '^(%S+) (%S+)$')
    if tenant then
      local key = ROOT .. ':' .. tenant .. ':job:' .. id
      if tonumber(redis.call('HGET', key, 'state') or '0') == 1 then
        local entry = redis.call('XADD', STREAM, '*', 'tenant', tenant, 'id', id)
        redis.call('HSET', key, 'entry', entry)
      end
    end
  end
end
return 0
