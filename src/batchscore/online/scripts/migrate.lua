-- One Redis published with control keys before they carried a hash tag
-- (`prefix:current`, ...): rename them to the tagged names (`{prefix}:current`, ...), once,
-- atomically, so that versions published then stay live and readable until retired.
-- KEYS: old pointer, new pointer, old versions, new versions, old staged, new staged.
-- ARGV: old manifest prefix, new manifest prefix. Returns the manifests moved.
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
local moved = 0
for _, pair in ipairs({{KEYS[3], KEYS[4]}, {KEYS[5], KEYS[6]}}) do
  for _, version in ipairs(redis.call('ZRANGE', pair[1], 0, -1)) do
    if redis.call('EXISTS', ARGV[1] .. version) == 1 then
      redis.call('RENAME', ARGV[1] .. version, ARGV[2] .. version)
      moved = moved + 1
    end
  end
  if redis.call('EXISTS', pair[1]) == 1 then
    redis.call('RENAME', pair[1], pair[2])
  end
end
redis.call('RENAME', KEYS[1], KEYS[2])
return moved
