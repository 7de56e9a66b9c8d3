-- Rollback: `current` back to the newest kept version older than it, in one step, and only
-- if `current` is still what the caller saw. KEYS: pointer, versions. ARGV: prefix,
-- expected current, now. Returns the version now current.
local current = redis.call('GET', KEYS[1])
if not current then
  return redis.error_reply('NOVERSION nothing is published')
end
if current ~= ARGV[2] then
  return redis.error_reply('MOVED the live version changed to ' .. current .. ' meanwhile')
end
local older = redis.call('ZRANGE', KEYS[2], 0, -1)
local previous = false
for i = 1, #older do
  if older[i] < current and (not previous or older[i] > previous) then
    previous = older[i]
  end
end
if not previous then
  return redis.error_reply('NOPREVIOUS no published version older than ' .. current .. ' is kept')
end
local manifest = ARGV[1] .. ':manifest:' .. previous
if redis.call('EXISTS', manifest) == 0 then
  return redis.error_reply('RETIRED ' .. previous .. ' has been retired')
end
redis.call('SET', KEYS[1], previous)
redis.call('HSET', manifest, 'status', 'current', 'restored_at', ARGV[3])
redis.call('HSET', ARGV[1] .. ':manifest:' .. current, 'status', 'rolled back',
  'rolled_back_at', ARGV[3])
return previous
