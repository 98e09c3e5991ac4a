-- wrk sends requests signed beforehand, each once, in order (benchmarks/bench_api.py).
--
-- custody serve refuses a signed request whose nonce it has seen (401), so wrk must never send
-- one twice: Python signs the requests (benchmarks/wrk_load.py) and writes them to one file a
-- wrk thread, CUSTODY_WRK_REQUESTS .. "-" .. N for thread N (1, 2, ...), one request a line:
--
--     METHOD TARGET NAME:VALUE NAME:VALUE ...      (the headers; no body)
--
-- Each thread builds its requests before the run starts and hands out the next one each time a
-- connection is free. When its file is used up it sends nothing more (its connections wait
-- idle until wrk's duration ends) and says so: the run is then void, never measured on idle
-- connections. Every answer's status is counted, and with CUSTODY_WRK_EXPECT set, every answer
-- whose body does not hold that text (a read that failed and answered otherwise); done() writes
-- the results to the file named by CUSTODY_WRK_RESULT, one "key value" a line, for wrk_load.py.

local prepared = {}
local next_request = 1
local threads = {}
local expect = os.getenv("CUSTODY_WRK_EXPECT")

-- Globals of each thread, read by done() through thread:get().
ran_out = false
signed = 0
statuses = {}
unexpected = 0

function setup(thread)
   table.insert(threads, thread)
   thread:set("id", #threads)
end

function init(args)
   local path = os.getenv("CUSTODY_WRK_REQUESTS") .. "-" .. id
   local file = assert(io.open(path, "r"))
   for line in file:lines() do
      local method, target, rest = line:match("^(%u+) (%S+)(.*)$")
      assert(method, path .. ": not a pre-signed request: " .. line)
      local headers = {}
      for name, value in rest:gmatch(" ([^: ]+):(%S+)") do
         headers[name] = value
      end
      prepared[#prepared + 1] = wrk.format(method, target, headers)
   end
   file:close()
   signed = #prepared
end

function request()
   local r = prepared[next_request]
   if r == nil then
      ran_out = true
      return "" -- nothing is written: this connection waits until the run ends
   end
   prepared[next_request] = nil -- never again
   next_request = next_request + 1
   return r
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   if expect and not body:find(expect, 1, true) then
      unexpected = unexpected + 1
   end
end

function done(summary, latency, rates)
   local out = assert(io.open(os.getenv("CUSTODY_WRK_RESULT"), "w"))
   out:write(string.format("requests %d\n", summary.requests))
   out:write(string.format("duration_us %d\n", summary.duration))
   for _, p in ipairs({ 50, 90, 99, 99.9 }) do
      out:write(string.format("p%s_us %d\n", p, latency:percentile(p)))
   end
   out:write(string.format("max_us %d\n", latency.max))
   for name, n in pairs(summary.errors) do
      out:write(string.format("error_%s %d\n", name, n))
   end
   for _, thread in ipairs(threads) do
      out:write(string.format("signed %d\n", thread:get("signed")))
      out:write(string.format("unexpected %d\n", thread:get("unexpected")))
      if thread:get("ran_out") then
         out:write("ran_out 1\n")
      end
      for status, n in pairs(thread:get("statuses")) do
         out:write(string.format("status_%d %d\n", status, n))
      end
   end
   out:close()
end
