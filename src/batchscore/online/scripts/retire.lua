-- Mark a version retired before its rows are deleted, in one step: from then on no
-- rollback, promote or shard can pick it. Refuses the live version.
-- KEYS: pointer, manifest, versions, staged. ARGV: version, now.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.error_reply('CURRENT it is the current version')
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'status', 'retired', 'retired_at', ARGV[2])
end
return 1
