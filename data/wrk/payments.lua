-- wrk script: POST /payments with a fresh Idempotency-Key on every request.
-- Usage: wrk -t2 -c32 -d10s -s data/wrk/payments.lua http://127.0.0.1:8080
-- Env: PAYTRACE_API_KEY, the server's comma-separated keys: the first is sent
-- (default sk_test_paytrace).
local threads = {}
local api_key = (os.getenv("PAYTRACE_API_KEY") or ""):match("^%s*([^,%s]+)") or "sk_test_paytrace"
local body = '{"amount":1999,"currency":"usd","source":"tok_visa"}'

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  -- A per-run prefix, so two runs against the same database do not replay each other.
  prefix = string.format("wrk-%d-%d", os.time(), math.floor(os.clock() * 1e6))
end

function request()
  counter = counter + 1
  local key = string.format("%s-%d-%d", prefix, id, counter)
  return wrk.format("POST", "/payments", {
    ["Authorization"] = "Bearer " .. api_key,
    ["Idempotency-Key"] = key,
    ["Content-Type"] = "application/json",
  }, body)
end

function done(summary, latency, requests)
  local s = summary.status or {}
  io.write(string.format("non-2xx: %d, socket errors: connect %d read %d write %d timeout %d\n",
    summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout))
end
