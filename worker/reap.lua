-- Remove dead consumers from the group once they own nothing (docs/CONTRACTS.md, "Delivery").
-- KEYS: one shard's lane streams of the model. ARGV: group, min_idle_ms, then the candidates' names (consumers
-- whose heartbeat key is gone: worker/claims.py checks that first, since that key is in no shard's slot).
-- A consumer is dead when it has no pending entries, has been idle longer than min_idle_ms and has no
-- heartbeat. Checked again and deleted in one script, so an entry cannot be handed to it in between.
-- Returns the names removed (a name once, however many lanes it was removed from).
local candidate = {}
for i = 3, #ARGV do candidate[ARGV[i]] = true end
local removed, seen = {}, {}
for s = 1, #KEYS do
  local key = KEYS[s]
  if redis.call('EXISTS', key) == 1 then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, ARGV[1])) do
      local info = {}
      for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
      local name = info['name']
      if candidate[name] and info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
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
