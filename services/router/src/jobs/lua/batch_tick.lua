-- The janitor's round of the batches: starts, expires and goes on closing the batches due now, of
-- every tenant (ARGV 2 is unused).
-- ARGV: 4 most batches  5 close chunk  6 retention (ms)
local due = redis.call('ZRANGE', DUE, '-inf', NOW, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[4]))
for _, member in ipairs(due) do
  local tenant, bid = string.match(member, '^(%S+) (%S+)$')
  if tenant then
    use_tenant(tenant)
    tick_batch(bid, tonumber(ARGV[5]), ARGV[6])
  else
    redis.call('ZREM', DUE, member)
  end
end
return #due
