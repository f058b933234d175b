-- The "lua-static" variant of `make bench`: what an Envoy user would write instead of
-- ibex-directive, with Envoy's built-in Lua filter: one fixed system message, taken
-- from the config, prepended to `messages` of every chat request.
--
-- It buffers the whole body, copies it into a Lua string, finds `"messages": [`
-- with a pattern and writes the concatenation back (setBytes also fixes
-- content-length). No JSON validation, no per-agent lookup: a lower bound for any
-- Lua solution. bench/run.py replaces @MESSAGE@ with the JSON-escaped directive.

local MESSAGE = '{"role":"system","content":"@MESSAGE@"}'

function envoy_on_request(handle)
  local body = handle:body()
  if body == nil then
    return
  end
  local text = body:getBytes(0, body:length())
  local _, open = string.find(text, '"messages"%s*:%s*%[')
  if open == nil then
    return
  end
  local rest = string.sub(text, open + 1)
  local sep = ","
  if string.find(rest, "^%s*%]") then
    sep = ""
  end
  body:setBytes(string.sub(text, 1, open) .. MESSAGE .. sep .. rest)
end
