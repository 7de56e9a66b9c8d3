-- One Redis only: the rows of a slice of a version's buckets, counted server-side (one HLEN
-- per bucket, names built here: ~20x fewer round trips and replies than an HLEN each from
-- the client). ARGV: rows prefix, first bucket, last bucket. Returns the sum.
local total = 0
for bucket = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  total = total + redis.call('HLEN', ARGV[1] .. bucket)
end
return total
