-- Take over entries that other (dead) consumers left idle longer than ARGV[3] ms (docs/CONTRACTS.md, "Delivery").
-- KEYS: the model's lane streams in priority order.
-- ARGV: group, consumer, min_idle_ms, count, suspects (1: this worker runs nothing now and may take one).
-- An entry delivered more than once already went down with a worker at least twice: it may be what kills
-- the engine (a poison pill). Such a suspect is taken alone, by a worker that runs nothing else, so only the
-- pill itself dies with it and its batchmates finish; the others are taken as many as `count`.
-- Returns {entries, suspect_waiting}: entries = {{lane_index, entry_id, fields, deliveries, suspect}, ...},
-- at most `count` (or the one suspect), highest lane first; suspect_waiting = 1 if a suspect was found and
-- not taken (this worker is busy: it should run nothing new until it can take it).
-- XCLAIM with min-idle takes an entry only if it is still idle, so two workers never take the same one; a
-- running worker renews its own entries well within min_idle_ms, so a long generation is never taken.
local want = tonumber(ARGV[4])
local may_take_suspect = ARGV[5] == '1'
local out, waiting = {}, 0

local function claim(i, key, id)
  local got = redis.call('XCLAIM', key, ARGV[1], ARGV[2], ARGV[3], id)
  if not got[1] then return nil end
  local p = redis.call('XPENDING', key, ARGV[1], id, id, 1)  -- the delivery count after this claim
  return {i, got[1][1], got[1][2], p[1] and p[1][4] or 1}
end

for i, key in ipairs(KEYS) do
  if want <= 0 then break end
  if redis.call('EXISTS', key) == 1 then
    local start = '-'
    for _ = 1, 10 do  -- each call looks at most at 10 * count pending entries; bound the work per call
      local page = redis.call('XPENDING', key, ARGV[1], 'IDLE', ARGV[3], start, '+', want)
      for _, p in ipairs(page) do
        local id, delivered = p[1], p[4]
        if delivered < 2 then
          local e = claim(i, key, id)
          if e then
            e[5] = 0
            out[#out + 1] = e
            want = want - 1
          end
        elseif may_take_suspect and #out == 0 then
          local e = claim(i, key, id)
          if e then
            e[5] = 1
            return {{e}, 0}  -- alone
          end
        else
          waiting = 1
        end
        if want <= 0 then break end
        start = '(' .. id
      end
      if #page == 0 or want <= 0 then break end
    end
  end
end
return {out, waiting}
