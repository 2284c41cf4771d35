-- Counts of a queue (read only).
-- ARGV: 4 queue
local q = ARGV[4]
local oldest = redis.call('ZRANGE', qkey(q, 'born'), 0, 0, 'WITHSCORES')
return {
  redis.call('ZCARD', qkey(q, 'pending')),
  redis.call('SCARD', qkey(q, 'claimed')),
  redis.call('ZCOUNT', qkey(q, 'sla'), '-inf', fmt(NOW)),
  oldest[2] or '',
  redis.call('ZCOUNT', qkey(q, 'decided'), '(' .. fmt(NOW - WINDOW), '+inf'),
  redis.call('HGETALL', qkey(q, 'counts')),
}
