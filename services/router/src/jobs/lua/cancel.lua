-- Cancels a job that has not ended; a terminal job is returned unchanged. Its stream entry, if
-- any, is dropped by the worker that reads it (or is running it).
-- ARGV: 4 id  5 retention (ms)
local id = ARGV[4]
local h = load(id)
if not h then
  return {'not_found'}
end
if tonumber(h.state) < 3 then
  finish(id, '5', ARGV[5])
end
return done(id)
