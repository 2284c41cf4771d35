-- Commit: settles a reservation with its actual cost, once.
-- Invariants: the hold is given back and the cost added to spend in one atomic step (so held +
-- spent only ever drops, unless the cost overruns the hold, which is then recorded as spend that
-- later reservations see); a reservation is charged at most once ('com' is set with the charge);
-- the soft-limit event of a period is claimed with HSETNX, so it fires exactly once.
-- A HELD reservation past its expiry is expired first; a commit on an EXPIRED reservation still
-- records the cost (the model ran) as an overrun, without touching any hold.
-- KEYS: 1 reservation key, 2 expiry index.
-- ARGV: 1 now, 2 cost, 3 request id, 4 input tokens, 5 output tokens, 6 cached input tokens,
--       7 retention ms, 8 usage retention ms.
local rkey, zkey = KEYS[1], KEYS[2]
local r = load(rkey)
if not r then
  return {'NOTFOUND'}
end
local now, cost, rid, retention = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[7])
if r.st == 'H' and tonumber(r.ex) <= now then
  expire_reservation(rkey, r, zkey, now, retention)
end
if r.st == 'R' then
  return reply('RELEASED', r)
end
if r.com then
  if rid ~= '' and (r.rid or '') ~= '' and rid ~= r.rid then
    return reply('CONFLICT', r)
  end
  return reply('REPLAY', r)
end
local amount = tonumber(r.amt)
local held = r.st == 'H'
local refunded, overrun = 0, cost
if held then
  if cost <= amount then
    refunded, overrun = amount - cost, 0
  else
    overrun = cost - amount
  end
end
local events = {}
local hour = int(math.floor(now / 3600000) * 3600)
local m = r.mdl
for i = 1, tonumber(r.n) do
  local c = r['c' .. i]
  if c ~= '' then
    local width = tonumber(r['w' .. i])
    if held then
      redis.call('HINCRBY', c, 'held', int(-amount))
    end
    add_spent(c, width, now, cost)
    expire_no_earlier(c, counter_expiry(r, i, now, retention))
    local soft = tonumber(redis.call('HGET', r['b' .. i], 'soft') or '0')
    if soft > 0 then
      local spent = window_spent(c, width, tonumber(r['k' .. i]), now)
      if spent >= soft then
        if redis.call('HSETNX', c, 'soft', int(now)) == 1 then
          events[#events + 1] = r['s' .. i]
          events[#events + 1] = int(spent)
          events[#events + 1] = int(soft)
        end
      elseif width > 0 then
        -- A rolling window has no reset: the event re-arms once spend falls below the limit.
        redis.call('HDEL', c, 'soft')
      end
    end
  end
  local ukey = r['u' .. i] .. ':' .. hour
  redis.call('HINCRBY', ukey, m .. '|c', int(cost))
  redis.call('HINCRBY', ukey, m .. '|n', 1)
  redis.call('HINCRBY', ukey, m .. '|i', ARGV[4])
  redis.call('HINCRBY', ukey, m .. '|o', ARGV[5])
  redis.call('HINCRBY', ukey, m .. '|h', ARGV[6])
  redis.call('PEXPIRE', ukey, ARGV[8])
end
r.com, r.ref, r.ovr, r.rid = int(cost), int(refunded), int(overrun), rid
if held then
  r.st = 'C'
  redis.call('ZREM', zkey, rkey)
end
redis.call('HSET', rkey, 'st', r.st, 'com', r.com, 'ref', r.ref, 'ovr', r.ovr, 'rid', rid, 'done', int(now))
redis.call('PEXPIRE', rkey, int(retention))
return reply('OK', r, events)
