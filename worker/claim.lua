-- Take over entries that other (dead) consumers left idle longer than ARGV[3] ms (docs/CONTRACTS.md, "Delivery").
-- KEYS: the model's lane streams in priority order.
-- ARGV: group, consumer, min_idle_ms, count.
-- Returns {{lane_index, entry_id, fields, deliveries}, ...}: at most `count` entries, highest lane first.
-- XAUTOCLAIM only takes entries still idle when it runs, so two workers never take the same one; a running
-- worker renews its own entries well within min_idle_ms, so a long generation is never taken.
local want = tonumber(ARGV[4])
local out = {}
for i, key in ipairs(KEYS) do
  if want <= 0 then break end
  if redis.call('EXISTS', key) == 1 then
    local cursor = '0-0'
    for _ = 1, 10 do  -- each call scans at most 10 * COUNT pending entries; bound the work per call
      local res = redis.call('XAUTOCLAIM', key, ARGV[1], ARGV[2], ARGV[3], cursor, 'COUNT', want)
      cursor = res[1]
      for _, e in ipairs(res[2]) do
        -- the delivery count after this claim (XAUTOCLAIM increments it)
        local p = redis.call('XPENDING', key, ARGV[1], e[1], e[1], 1)
        local deliveries = 1
        if p[1] then deliveries = p[1][4] end
        out[#out + 1] = {i, e[1], e[2], deliveries}
        want = want - 1
      end
      if cursor == '0-0' or want <= 0 then break end
    end
  end
end
return out
