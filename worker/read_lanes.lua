-- Read up to ARGV[3] new entries for consumer ARGV[2] of group ARGV[1] (docs/CONTRACTS.md, "Delivery").
-- KEYS: the model's lane streams in priority order (high, normal, low).
-- ARGV[4..]: per lane, how many of the slots are reserved for it first (anti-starvation: a lower lane
-- that has work still gets its minimum share). Then the remaining slots are filled highest lane first.
-- Returns {entries, tails}: entries = {{lane_index, entry_id, fields}, ...}, never more than ARGV[3];
-- when there are none, tails = each stream's newest entry id, so the worker can block (XREAD, which
-- takes nothing) until something newer arrives and then read here again.
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
local tails = {}
if #out == 0 then
  for i, key in ipairs(KEYS) do
    local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
    tails[i] = last[1] and last[1][1] or '0-0'
  end
end
return {out, tails}
