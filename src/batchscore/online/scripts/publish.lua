-- Publish: never backwards, only a version still staged, every shard counted, then switch
-- (re-publishing the current version is a no-op that reports success, so a resumed step is
-- safe). Supersession is checked first: a superseded run is told so, not that it is
-- incomplete. KEYS: pointer, manifest, versions, staged. ARGV: version, keys, shards, now.
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  return 1
end
if current and current > ARGV[1] then
  return 0
end
-- Staged, or published before and rolled back from (promote brings it back).
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) and not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return redis.error_reply('NOTSTAGED ' .. ARGV[1] .. ' is not staged (discarded, or never opened)')
end
local fields = redis.call('HGETALL', KEYS[2])
local written, shards = 0, 0
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 6) == 'shard:' then
    written = written + tonumber(fields[i + 1])
    shards = shards + 1
  end
end
if written ~= tonumber(ARGV[2]) or shards ~= tonumber(ARGV[3]) then
  return redis.error_reply('INCOMPLETE ' .. written .. ' keys in ' .. shards ..
    ' shards, expected ' .. ARGV[2] .. ' in ' .. ARGV[3])
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HSET', KEYS[2], 'status', 'current', 'published_at', ARGV[4])
return 1
