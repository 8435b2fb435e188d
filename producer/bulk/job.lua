-- The writes that move a bulk job forward (producer/bulk/state.py). Each one checks where the job stands
-- first (compare-and-set), so a runner that lost its lease to another one writes nothing twice.
-- KEYS[1] the job's hash, KEYS[2] its reply stream (only for 'feed'). ARGV[1] the operation:
--
-- 'feed', expected fed, lines, requests, feed_done (0/1), error records...: one fed batch. The batch's error
--   records (lines that never became a request) go to the reply stream, then `fed` and `submitted` advance.
-- 'tally', expected tallied_to, new tallied_to, field, increment, ...: counts of the reply-stream records
--   read up to the new id.
-- 'state', new state, allowed current states...: a state change; returns the state after the call
--   (unchanged if the current one is not allowed), '' if there is no such job.
local op = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return op == 'state' and '' or 0
end
if op == 'feed' then
  if tonumber(redis.call('HGET', KEYS[1], 'fed') or '0') ~= tonumber(ARGV[2]) then
    return 0
  end
  for i = 6, #ARGV do
    redis.call('XADD', KEYS[2], '*', 'm', ARGV[i])
  end
  redis.call('HINCRBY', KEYS[1], 'fed', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'submitted', ARGV[4])
  if ARGV[5] == '1' then
    redis.call('HSET', KEYS[1], 'feed_done', '1')
  end
  return 1
elseif op == 'tally' then
  if (redis.call('HGET', KEYS[1], 'tallied_to') or '0-0') ~= ARGV[2] then
    return 0
  end
  redis.call('HSET', KEYS[1], 'tallied_to', ARGV[3])
  for i = 4, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  return 1
elseif op == 'state' then
  local now = redis.call('HGET', KEYS[1], 'state')
  for i = 3, #ARGV do
    if now == ARGV[i] then
      redis.call('HSET', KEYS[1], 'state', ARGV[2])
      return ARGV[2]
    end
  end
  return now
end
return redis.error_reply('unknown bulk operation ' .. tostring(op))
