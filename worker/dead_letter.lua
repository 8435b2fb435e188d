-- Dead-letter an entry that has no usable request id (undecodable): nothing to store, only the letter and
-- the acknowledgement (docs/CONTRACTS.md, "Delivery"). An entry with an id goes through finish.lua instead.
-- KEYS[1] the model's DLQ, KEYS[2] its count of dead letters dropped, KEYS[3] the lane stream.
-- ARGV[1] the DLQ's length bound, [2] group, [3] entry id, [4..] the DLQ entry's fields and values.
local dead = {}
for i = 4, #ARGV do dead[#dead + 1] = ARGV[i] end
add_dead_letter(KEYS[1], KEYS[2], ARGV[1], dead)
redis.call('XACK', KEYS[3], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[3], ARGV[3])
return 1
