-- Remove dead consumers from the group once they own nothing (docs/CONTRACTS.md, "Delivery").
-- KEYS: the model's lane streams (ARGV[3] of them), then the heartbeat key of each candidate.
-- ARGV: group, min_idle_ms, number of streams, then the candidates' names (in the order of their keys).
-- A consumer is dead when it has no pending entries, has been idle longer than min_idle_ms and has no
-- heartbeat key. Checked again and deleted in one script, so an entry cannot be handed to it in between.
-- Returns the names removed (a name once, however many lanes it was removed from).
local streams = tonumber(ARGV[3])
local heartbeat = {}
for i = 4, #ARGV do heartbeat[ARGV[i]] = KEYS[streams + i - 3] end
local removed, seen = {}, {}
for s = 1, streams do
  local key = KEYS[s]
  if redis.call('EXISTS', key) == 1 then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, ARGV[1])) do
      local info = {}
      for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
      local name = info['name']
      local beat = heartbeat[name]
      if beat and info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) and redis.call('EXISTS', beat) == 0 then
        redis.call('XGROUP', 'DELCONSUMER', key, ARGV[1], name)
        if not seen[name] then
          seen[name] = true
          removed[#removed + 1] = name
        end
      end
    end
  end
end
return removed
