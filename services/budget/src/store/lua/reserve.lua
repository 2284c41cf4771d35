-- Reserve: holds `amount` against every scope, or against none.
-- Invariant: for every scope with a budget, held + spent <= hard after the script, because the
-- check of every scope and the hold on every scope happen in one atomic step.
-- KEYS: 1 idempotency key, 2 reservation key, 3 the tenant's expiry index, then per scope: budget
--       key, counter key (the reservation key again for a scope without a budget: a placeholder in
--       the tenant's hash slot, where '' would make Redis Cluster refuse the call as CROSSSLOT).
-- ARGV: 1 id, 2 fingerprint, 3 amount, 4 now, 5 expire at, 6 idempotency TTL ms, 7 retention ms,
--       8 model, 9 n, then per scope 4 values: scope, budget generation seen by the caller,
--       rolling bucket ms (0 = calendar), buckets; then per scope: calendar period end, usage key.
local rkey, zkey = KEYS[2], KEYS[3]
local existing = redis.call('GET', KEYS[1])
if existing then
  local sep = string.find(existing, '|', 1, true)
  if string.sub(existing, sep + 1) ~= ARGV[2] then
    return {'MISMATCH'}
  end
  local r = load(string.sub(existing, 1, sep - 1))
  if not r then
    return {'GONE'}
  end
  return reply('REPLAY', r)
end
local amount, now, n = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[9])
local function arg(i, j)
  return ARGV[9 + (i - 1) * 4 + j]
end
local function tail(i, j)
  return ARGV[9 + n * 4 + (i - 1) * 2 + j]
end
-- The scope's budget and counter keys ('' for no counter).
local function scope_keys(i)
  local ckey = KEYS[3 + 2 * i]
  if ckey == rkey then
    ckey = ''
  end
  return KEYS[2 + 2 * i], ckey
end
-- Check every scope first: nothing is written unless all of them have room.
for i = 1, n do
  local bkey, ckey = scope_keys(i)
  local gen = redis.call('HGET', bkey, 'gen') or '0'
  if gen ~= arg(i, 2) then
    return {'STALE', tostring(i)}
  end
  if ckey ~= '' then
    local hard = tonumber(redis.call('HGET', bkey, 'hard'))
    local held = tonumber(redis.call('HGET', ckey, 'held') or '0')
    local spent, oldest = window_spent(ckey, tonumber(arg(i, 3)), tonumber(arg(i, 4)), now)
    if held + spent + amount > hard then
      return {'EXHAUSTED', tostring(i), int(oldest), int(held), int(spent), int(hard)}
    end
  end
end
local r = {id = ARGV[1], st = 'H', amt = ARGV[3], ct = ARGV[4], ex = ARGV[5], mdl = ARGV[8], n = ARGV[9]}
local fields = {'id', r.id, 'st', 'H', 'amt', r.amt, 'ct', r.ct, 'ex', r.ex, 'mdl', r.mdl, 'n', r.n}
for i = 1, n do
  local bkey, ckey = scope_keys(i)
  r['s' .. i], r['b' .. i], r['c' .. i] = arg(i, 1), bkey, ckey
  r['w' .. i], r['k' .. i], r['x' .. i], r['u' .. i] = arg(i, 3), arg(i, 4), tail(i, 1), tail(i, 2)
  for _, f in ipairs({'s', 'b', 'c', 'w', 'k', 'x', 'u'}) do
    fields[#fields + 1] = f .. i
    fields[#fields + 1] = r[f .. i]
  end
  if ckey ~= '' then
    redis.call('HINCRBY', ckey, 'held', int(amount))
    expire_no_earlier(ckey, counter_expiry(r, i, now, tonumber(ARGV[7])))
  end
end
redis.call('HSET', rkey, unpack(fields))
redis.call('PEXPIREAT', rkey, int(tonumber(ARGV[5]) + tonumber(ARGV[7])))
redis.call('ZADD', zkey, ARGV[5], rkey)
redis.call('SET', KEYS[1], rkey .. '|' .. ARGV[2], 'PX', ARGV[6])
return reply('OK', r)
