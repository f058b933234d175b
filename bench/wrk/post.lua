-- wrk script of `make bench`: POST a JSON body with a per-request x-agent-id.
--
--   wrk ... -s bench/wrk/post.lua URL -- PATH BODY_FILE MODE PREFIX BASE COUNT [KEY_FILE]
--
-- PATH       request path, e.g. /v1/chat/completions
-- BODY_FILE  file holding the request body (sent as is)
-- MODE       none    no agent header
--            fixed   every request: agent PREFIX/BASE
--            cycle   agents PREFIX/BASE .. PREFIX/BASE+COUNT-1 in turn (requests
--                    prebuilt when COUNT <= 20000 so wrk's own cost stays that of `fixed`)
--            fresh   a new agent every request: PREFIX/BASE, BASE+1, ... (one wrk
--                    thread; the driver advances BASE past every id a run used)
--            key     no agent header: every request `authorization: Bearer <key>`,
--                    the key read from KEY_FILE (so it is in no process list)
-- PREFIX     first group of the agent UUID (8 hex digits); the id of agent n is
--            PREFIX-0000-4000-8000-<n as 12 hex digits>
--
-- done() prints one line `WRKJSON {...}` with the counts and latency percentiles
-- (microseconds) that bench/run.py parses.

local path, body, mode, prefix, base, count
local req, reqs, n = nil, nil, 0

local function agent(i)
  return string.format("%s-0000-4000-8000-%012x", prefix, i)
end

local function build(id, key)
  local headers = { ["content-type"] = "application/json" }
  if id then headers["x-agent-id"] = id end
  if key then headers["authorization"] = "Bearer " .. key end
  return wrk.format("POST", path, headers, body)
end

function init(args)
  path = args[1]
  local f = assert(io.open(args[2], "rb"))
  body = f:read("*a")
  f:close()
  mode = args[3] or "none"
  prefix = args[4] or "00000000"
  base = tonumber(args[5] or "0")
  count = tonumber(args[6] or "1")
  if mode == "none" then
    req = build(nil)
  elseif mode == "fixed" then
    req = build(agent(base))
  elseif mode == "key" then
    local k = assert(io.open(assert(args[7], "mode key needs KEY_FILE"), "rb"))
    local key = k:read("*a"):gsub("%s+$", "")
    k:close()
    assert(#key > 0, "KEY_FILE is empty")
    req = build(nil, key)
  elseif mode == "cycle" and count <= 20000 then
    reqs = {}
    for i = 0, count - 1 do reqs[i] = build(agent(base + i)) end
  elseif mode ~= "cycle" and mode ~= "fresh" then
    error("unknown mode " .. mode)
  end
end

function request()
  if req then return req end
  local i = n
  n = n + 1
  if mode == "cycle" then
    i = i % count
    if reqs then return reqs[i] end
  end
  return build(agent(base + i))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
