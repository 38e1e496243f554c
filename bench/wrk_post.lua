-- wrk script for the clawbus benchmark (bench/wrk.py runs it).
--
-- POSTs the JSON body in $BENCH_BODY with "Authorization: Bearer $BENCH_AUTH" (when
-- set). With $BENCH_MAX_REQUESTS each thread stops after that many responses (the
-- fixed-count CPU-per-request run) and prints "BENCH_STOPPED". done() prints one line "BENCH_JSON {...}" with
-- the request count, errors and latency percentiles in microseconds.

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or "{}"
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

-- With $BENCH_SESSIONS = N, request k goes to session "<prefix><k mod N>" (header
-- x-openclaw-session-key; prefix $BENCH_SESSION_PREFIX, default "bench-"):
-- stateful runs, each session's turns one after another. A body holding "@N@"
-- gets request k's number there (k = 1, 2, …): each turn's prompt is told apart.
local sessions = tonumber(os.getenv("BENCH_SESSIONS") or "")
local prefix = os.getenv("BENCH_SESSION_PREFIX") or "bench-"
local numbered = string.find(wrk.body, "@N@", 1, true) ~= nil
if (sessions and sessions > 0) or numbered then
  local sent = 0
  local template = wrk.body
  function request()
    sent = sent + 1
    if sessions and sessions > 0 then
      wrk.headers["x-openclaw-session-key"] = prefix .. (sent % sessions)
    end
    local body = nil
    if numbered then
      body = string.gsub(template, "@N@", tostring(sent))
    end
    return wrk.format(nil, nil, nil, body)
  end
end

local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "")
if max_requests then
  local count = 0
  function response(status, headers, body)
    count = count + 1
    if count == max_requests then
      -- wrk's main thread sleeps for the whole -d duration: tell the harness,
      -- which then ends the run early with SIGINT (done() still runs).
      io.write("BENCH_STOPPED\n")
      io.flush()
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local out = string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"max":%d,"mean":%.3f,"stdev":%.3f,' ..
    '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9))
  io.write("BENCH_JSON " .. out .. "\n")
end
