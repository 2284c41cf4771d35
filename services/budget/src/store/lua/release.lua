-- Release: HELD -> RELEASED, giving the hold back to every scope; anything else is unchanged.
-- A HELD reservation past its expiry becomes EXPIRED instead (the hold is given back once).
-- KEYS: 1 reservation key, 2 expiry index. ARGV: 1 now, 2 retention ms.
local rkey, zkey = KEYS[1], KEYS[2]
local r = load(rkey)
if not r then
  return {'NOTFOUND'}
end
local now, retention = tonumber(ARGV[1]), tonumber(ARGV[2])
if r.st == 'H' and tonumber(r.ex) <= now then
  expire_reservation(rkey, r, zkey, now, retention)
elseif r.st == 'H' then
  local amount = tonumber(r.amt)
  for i = 1, tonumber(r.n) do
    local c = r['c' .. i]
    if c ~= '' then
      redis.call('HINCRBY', c, 'held', int(-amount))
    end
  end
  r.st = 'R'
  redis.call('HSET', rkey, 'st', 'R', 'done', int(now))
  redis.call('ZREM', zkey, rkey)
  redis.call('PEXPIRE', rkey, int(retention))
end
return reply('OK', r)
