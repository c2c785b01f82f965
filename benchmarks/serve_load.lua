-- wrk script of benchmarks/serve_latency.py: POSTs one body over and over; done() prints one JSON line.
-- Read from the environment (every thread's Lua state reads it):
--   WRK_BODY         the file holding the body (read binary)
--   WRK_CTYPE        its Content-Type
--   WRK_KIND         single, bulk-json or bulk-arrow
--   WRK_ROWS         rows per request
--   WRK_SCORES_ONLY  1: the server answers only the scores ({"scores":[...]} or one anomaly_score column)
--   WRK_WARMUP       > 0 for the warm-up: response() checks a sample of the answers (JSON: one score per row
--                    sent; Arrow: an IPC stream) and, after that many answers, prints WRKWARMED and stops the
--                    thread; the harness then ends wrk with SIGINT (it still reports)
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("WRK_CTYPE")

local KIND, ROWS = os.getenv("WRK_KIND"), tonumber(os.getenv("WRK_ROWS"))
local LIMIT, SCORES_ONLY = tonumber(os.getenv("WRK_WARMUP") or "0"), os.getenv("WRK_SCORES_ONLY") == "1"

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

if LIMIT > 0 then
  -- globals: done() reads them from each thread with thread:get
  answers, checked, bad = 0, 0, 0
  function response(status, headers, body)
    answers = answers + 1
    if status == 200 and (answers <= 20 or answers % 20 == 0) then
      checked = checked + 1
      local good
      if KIND == "bulk-arrow" then
        good = #body > 8 and body:sub(1, 4) == "\255\255\255\255"
      elseif SCORES_ONLY then
        local inner = body:match('^{"scores":%[(.*)%]}$')
        good = inner ~= nil and select(2, inner:gsub(",", "")) + 1 == ROWS
      else
        local _, n = body:gsub('"anomaly_score"', "")
        good = n == ROWS
      end
      if not good then bad = bad + 1 end
    end
    if answers == LIMIT then
      io.write("WRKWARMED\n")
      io.flush()
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local checked_all, bad_all = 0, 0
  for _, t in ipairs(threads) do
    checked_all = checked_all + (t:get("checked") or 0)
    bad_all = bad_all + (t:get("bad") or 0)
  end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d},"checked":%d,"bad":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    checked_all, bad_all))
  io.flush()
end
