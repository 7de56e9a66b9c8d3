-- Rows of an id-keyed version into one bucket, so that across shards the first row in input
-- order wins: a field is written when it is absent, or when the shard that wrote it comes
-- later in input order (a higher shard number) than this one. Who wrote each field is kept
-- in a staging-only companion hash in the bucket's own slot (dropped at the join). A replay
-- (the same shard writing its own fields again) changes nothing.
-- KEYS: bucket, owner hash. ARGV: shard, bucket TTL (0: none), owner TTL, field, value, ...
-- Returns the fields this call wrote.
local shard = tonumber(ARGV[1])
local pairs_total = (#ARGV - 3) / 2
local written = 0
local step = 500 -- fields per HMGET/HSET: unpack() stays far below Lua's stack limit
for first = 0, pairs_total - 1, step do
  local last = math.min(pairs_total, first + step) - 1
  local names = {}
  for j = first, last do
    names[#names + 1] = ARGV[4 + 2 * j]
  end
  local owners = redis.call('HMGET', KEYS[2], unpack(names))
  local rows, marks = {}, {}
  for k = 1, #names do
    local owner = owners[k]
    if not owner or tonumber(owner) > shard then
      local at = 4 + 2 * (first + k - 1)
      rows[#rows + 1] = ARGV[at]
      rows[#rows + 1] = ARGV[at + 1]
      marks[#marks + 1] = ARGV[at]
      marks[#marks + 1] = ARGV[1]
    end
  end
  if #rows > 0 then
    redis.call('HSET', KEYS[1], unpack(rows))
    redis.call('HSET', KEYS[2], unpack(marks))
    written = written + #rows / 2
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
redis.call('EXPIRE', KEYS[2], ARGV[3])
return written
