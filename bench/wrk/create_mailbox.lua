-- wrk script: POST /v1/mailboxes with a unique username per request (the IdM refuses repeats).
-- BENCH_TOKEN (a bearer token) and BENCH_RUN (a short lower-case tag, unique per run) come
-- from the environment. done() prints one line "WRK_JSON {...}" with the counts and the
-- latency percentiles in microseconds, for bench.api to parse.
local token = os.getenv("BENCH_TOKEN") or ""
local run = os.getenv("BENCH_RUN") or "r"
local threads = 0
local counter = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function request()
  counter = counter + 1
  local name = string.format("b%s%d%x", run, tid, counter)
  local body = '{"username":"' .. name .. '","display_name":"Bench User","plan":"standard",'
    .. '"contact_email":"' .. name .. '@example.com"}'
  return wrk.format("POST", "/v1/mailboxes", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. token,
  }, body)
end

function done(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"status_errors":%d,"connect_errors":%d,'
      .. '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,'
      .. '"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
