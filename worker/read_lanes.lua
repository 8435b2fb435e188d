-- Read up to ARGV[3] new entries for consumer ARGV[2] of group ARGV[1], highest lane first.
-- KEYS: the model's lane streams in priority order. Returns {{lane_index, entry_id, fields}, ...}.
-- One script, so a worker never takes more entries than it has free slots (DESIGN.md "Delivery").
local want = tonumber(ARGV[3])
local out = {}
for i, key in ipairs(KEYS) do
  if want <= 0 then break end
  local res = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want, 'STREAMS', key, '>')
  if res then
    for _, e in ipairs(res[1][2]) do
      out[#out + 1] = {i, e[1], e[2]}
    end
    want = want - #res[1][2]
  end
end
return out
