-- A shard's count is recorded only while its version is still staged (or already live):
-- a version that `retire` dropped mid-write must not get its manifest back.
-- KEYS: manifest, staged, versions. ARGV: version, count field, count, sample field, sample.
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) and not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return 1
