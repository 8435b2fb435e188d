-- Renew this worker's claim on the entries it is running: reset their idle time so nobody takes them over.
-- KEYS[1] a lane stream. ARGV: group, consumer, entry ids...
-- Only entries this consumer still owns are renewed: one that another worker took over meanwhile (this
-- worker could not renew in time, e.g. Redis was down) is not stolen back. Returns the ids it lost.
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
