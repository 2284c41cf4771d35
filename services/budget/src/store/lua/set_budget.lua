-- SetBudget: replaces a scope's budget and bumps its generation in one step. Reserve checks the
-- generation it planned with, so a reservation never applies a stale period or limit.
-- KEYS: 1 budget key. ARGV: hard, soft, fraction, period kind, unit, time zone, window ms.
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'hard', ARGV[1], 'soft', ARGV[2], 'frac', ARGV[3], 'pk', ARGV[4],
  'unit', ARGV[5], 'tz', ARGV[6], 'win', ARGV[7])
return gen
