-- Claims due callback deliveries: each claimed entry's due time moves forward by the lease, so a
-- dispatcher that dies before recording an outcome leaves it due again once the lease passes.
-- ARGV: 4 lease (ms)  5 limit
local due = redis.call('ZRANGE', OUTBOX, '-inf', NOW, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[5]))
for _, member in ipairs(due) do
  redis.call('ZADD', OUTBOX, NOW + tonumber(ARGV[4]), member)
end
return due
