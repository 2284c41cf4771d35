-- A page of a queue's items, most urgent first (read only).
-- ARGV: 4 queue 5 state (0 = any) 6 after (urgency key, '' = from the start) 7 limit
-- Returns {next, items}: next is the last member scanned when more may follow, else ''.
local queue, want, limit = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[7])
local source = qkey(queue, 'all')
if want == 1 then
  source = qkey(queue, 'pending')
end
local min = '-'
if ARGV[6] ~= '' then
  min = '(' .. ARGV[6]
end
local out, last, more = {}, ARGV[6], false
local budget = limit * 20 + 200
while not more do
  local batch = redis.call('ZRANGEBYLEX', source, min, '+', 'LIMIT', 0, 100)
  if #batch == 0 then
    break
  end
  for _, member in ipairs(batch) do
    if #out >= limit or budget <= 0 then
      more = true
      break
    end
    budget = budget - 1
    last = member
    local id = string.match(member, ':([^:]*)$')
    local flat = redis.call('HGETALL', item_key(id))
    if #flat > 0 then
      local st = 0
      for i = 1, #flat, 2 do
        if flat[i] == 'state' then
          st = tonumber(flat[i + 1])
        end
      end
      if want == 0 or st == want then
        table.insert(out, flat)
      end
    end
  end
  min = '(' .. last
end
if not more then
  last = ''
end
return {last, out}
