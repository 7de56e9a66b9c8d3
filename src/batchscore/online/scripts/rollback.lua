-- Rollback: `current` back to the newest published version older than it that was never
-- rolled back from (nor retired), in one step, and only if `current` is still what the
-- caller saw. KEYS: pointer, versions. ARGV: control-key tag, expected current, now.
-- Returns the version now current. Manifests share the tag (one cluster slot).
local current = redis.call('GET', KEYS[1])
if not current then
  return redis.error_reply('NOVERSION nothing is published')
end
if current ~= ARGV[2] then
  return redis.error_reply('MOVED the live version changed to ' .. current .. ' meanwhile')
end
local published = redis.call('ZRANGE', KEYS[2], 0, -1)
table.sort(published)
local previous = false
local skipped = 0
for i = #published, 1, -1 do
  local candidate = published[i]
  if candidate < current then
    local status = redis.call('HGET', ARGV[1] .. ':manifest:' .. candidate, 'status')
    if status and status ~= 'rolled back' and status ~= 'retired' then
      previous = candidate
      break
    end
    skipped = skipped + 1
  end
end
if not previous then
  return redis.error_reply('NOPREVIOUS no published version older than ' .. current ..
    ' is kept that was not rolled back from or retired (' .. skipped .. ' skipped)')
end
redis.call('SET', KEYS[1], previous)
redis.call('HSET', ARGV[1] .. ':manifest:' .. previous, 'status', 'current', 'restored_at', ARGV[3])
redis.call('HSET', ARGV[1] .. ':manifest:' .. current, 'status', 'rolled back',
  'rolled_back_at', ARGV[3])
return previous
