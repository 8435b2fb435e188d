-- Remove dead consumers from the group once they own nothing (DESIGN.md "Delivery").
-- KEYS: the model's lane streams. ARGV: group, min_idle_ms, heartbeat key prefix ("{p}:w:"), self name.
-- A consumer is dead when it has no pending entries, has been idle longer than min_idle_ms and has no
-- heartbeat key. Checked and deleted in one script, so an entry cannot be handed to it in between.
local removed = {}
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, ARGV[1])) do
      local info = {}
      for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
      local name = info['name']
      if name ~= ARGV[4] and info['pending'] == 0 and info['idle'] > tonumber(ARGV[2])
          and redis.call('EXISTS', ARGV[3] .. name) == 0 then
        redis.call('XGROUP', 'DELCONSUMER', key, ARGV[1], name)
        removed[#removed + 1] = name
      end
    end
  end
end
return removed
