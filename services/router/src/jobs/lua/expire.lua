-- Ends a job that waited past its ttl without ever starting (EXPIRED), when a read finds it
-- before a worker does. Anything else is returned unchanged.
-- ARGV: 4 id  5 retention (ms)
local id = ARGV[4]
local h = load(id)
if not h then
  return {'not_found'}
end
if tonumber(h.state) == 1 and tonumber(h.attempts) == 0 and tonumber(h.expire) > 0
    and tonumber(h.expire) <= NOW then
  finish(id, '6', ARGV[5])
end
return done(id)
