-- Shared helpers of every budget script. Money and times are integers below 2^53, which Lua
-- numbers (doubles) hold exactly; they are always written back with int(), never with Lua's
-- default number formatting (which would print 1.2e+14).
local function int(n)
  return string.format('%d', n)
end

-- The reservation hash as a table, or nil.
local function load(rkey)
  local all = redis.call('HGETALL', rkey)
  if #all == 0 then
    return nil
  end
  local r = {}
  for i = 1, #all, 2 do
    r[all[i]] = all[i + 1]
  end
  return r
end

-- Spend in a counter's current period. Calendar counters (width 0) keep one 'spent' field;
-- rolling ones one 'b<bucket>' field per bucket, of which those older than the window are deleted.
-- Returns the spend and the oldest bucket that still holds some (-1 if none).
local function window_spent(ckey, width, buckets, now)
  if width == 0 then
    return tonumber(redis.call('HGET', ckey, 'spent') or '0'), -1
  end
  local first = math.floor(now / width) - buckets + 1
  local all = redis.call('HGETALL', ckey)
  local sum, oldest = 0, -1
  for i = 1, #all, 2 do
    local field = all[i]
    if string.sub(field, 1, 1) == 'b' then
      local bucket = tonumber(string.sub(field, 2))
      if bucket < first then
        redis.call('HDEL', ckey, field)
      else
        local v = tonumber(all[i + 1])
        sum = sum + v
        if v ~= 0 and (oldest < 0 or bucket < oldest) then
          oldest = bucket
        end
      end
    end
  end
  return sum, oldest
end

local function add_spent(ckey, width, now, delta)
  if width == 0 then
    redis.call('HINCRBY', ckey, 'spent', int(delta))
  else
    redis.call('HINCRBY', ckey, 'b' .. int(math.floor(now / width)), int(delta))
  end
end

-- Makes sure `key` expires, never earlier than `at` (Unix ms): a counter must outlive every
-- reservation that holds against it.
local function expire_no_earlier(key, at)
  redis.call('PEXPIREAT', key, int(at), 'NX')
  redis.call('PEXPIREAT', key, int(at), 'GT')
end

-- When a counter may be deleted: the end of its calendar period ('x' field) or, for a rolling
-- window, one window after now; plus the retention, so a late commit still finds it.
local function counter_expiry(r, i, now, retention)
  local width = tonumber(r['w' .. i])
  if width == 0 then
    return tonumber(r['x' .. i]) + retention
  end
  return now + width * tonumber(r['k' .. i]) + retention
end

-- HELD -> EXPIRED: gives the hold back to every scope. Only called on a HELD reservation, inside
-- an atomic script, so a hold is given back exactly once whoever (sweeper, Commit, Release) gets
-- there first.
local function expire_reservation(rkey, r, zkey, now, retention)
  local amount = tonumber(r.amt)
  for i = 1, tonumber(r.n) do
    local c = r['c' .. i]
    if c ~= '' then
      redis.call('HINCRBY', c, 'held', int(-amount))
    end
  end
  r.st = 'E'
  redis.call('HSET', rkey, 'st', 'E', 'done', int(now))
  redis.call('ZREM', zkey, rkey)
  redis.call('PEXPIRE', rkey, int(retention))
end

-- The reply shared by the scripts: code, then the reservation, then `extra`.
local function reply(code, r, extra)
  local out = {code, r.id, r.st, r.amt, r.com or '', r.ref or '0', r.ovr or '0', r.ct, r.ex, r.mdl, r.n}
  for i = 1, tonumber(r.n) do
    out[#out + 1] = r['s' .. i]
  end
  for _, e in ipairs(extra or {}) do
    out[#out + 1] = e
  end
  return out
end
