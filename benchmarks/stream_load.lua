-- wrk script of benchmarks/stream_latency.py: one reading per request, POST /v1/models/NAME/stream.
-- Environment (each thread's Lua state reads it):
--   WRK_ENTITIES  entities, <WRK_PREFIX>0 .. <WRK_PREFIX><N-1>; the requests take them in turn, so an entity's next reading is
--                 sent only after its previous one was answered (N > connections)
--   WRK_T0        the time of the first reading measured (integer); the k-th turn sends WRK_T0 + k
--   WRK_FEATURES  the feature columns and values of every reading, as a JSON fragment: "m0":0.1,"m1":...
-- done() prints one JSON line (WRKJSON …) with the answers' statuses counted.
local N = tonumber(os.getenv("WRK_ENTITIES"))
local PREFIX = os.getenv("WRK_PREFIX") or "e"
local T0 = tonumber(os.getenv("WRK_T0"))
local FEATURES = os.getenv("WRK_FEATURES")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

i, scored, warming, other = 0, 0, 0, 0
function request()
  local e = i % N
  local t = T0 + math.floor(i / N)
  i = i + 1
  local body = string.format('{"rows":[{"host":"%s%d","t":%d,%s}]}', PREFIX, e, t, FEATURES)
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  if status == 200 and body:find('"status":"scored"', 1, true) then
    scored = scored + 1
  elseif status == 200 and body:find('"status":"warming"', 1, true) then
    warming = warming + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local s, w, o = 0, 0, 0
  for _, t in ipairs(threads) do
    s, w, o = s + t:get("scored"), w + t:get("warming"), o + t:get("other")
  end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d},"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d},' ..
    '"scored":%d,"warming":%d,"other":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max, s, w, o))
  io.flush()
end
