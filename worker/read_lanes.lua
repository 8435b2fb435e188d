-- Read up to ARGV[3] new entries for consumer ARGV[2] of group ARGV[1] (docs/CONTRACTS.md, "Delivery").
-- KEYS: the model's lane streams in priority order (high, normal, low).
-- ARGV[4..]: per lane, how many of the slots are reserved for it first (anti-starvation: a lower lane
-- that has work still gets its minimum share). Then the remaining slots are filled highest lane first.
-- Returns {{lane_index, entry_id, fields}, ...}, never more than ARGV[3]. When there are none, the worker
-- blocks in XREADGROUP on every lane until some arrive (worker/consumer.py, _wait_for_entries).
local want = tonumber(ARGV[3])
local out = {}
local function take(i, n)
  if n <= 0 then return end
  local res = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', n, 'STREAMS', KEYS[i], '>')
  if res then
    for _, e in ipairs(res[1][2]) do
      out[#out + 1] = {i, e[1], e[2]}
    end
    want = want - #res[1][2]
  end
end
for i = 1, #KEYS do
  take(i, math.min(tonumber(ARGV[3 + i] or '0'), want))
end
for i = 1, #KEYS do
  if want <= 0 then break end
  take(i, want)
end
return out
