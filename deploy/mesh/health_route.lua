-- The edge proxy's health routing. Every service answers grpc.health.v1.Health/Check on the same path, and
-- the service asked about is in the request body (HealthCheckRequest.service, field 1): read it and name the
-- service in the x-tensafe-service header, which the edge's health routes match. A check of an unknown or
-- empty service name gets no header and goes to the ledger's process, which answers for itself.
-- deploy/mesh/render.py inlines this file into the edge's Lua filter; SERVICES is filled in there.
local SERVICES = {}  -- @SERVICES@

local HEALTH = {["/grpc.health.v1.Health/Check"] = true, ["/grpc.health.v1.Health/Watch"] = true}

-- The service field of one uncompressed gRPC-framed HealthCheckRequest, or nil.
local function service_name(bytes)
  if #bytes < 7 or string.byte(bytes, 1) ~= 0 or string.byte(bytes, 6) ~= 0x0A then
    return nil
  end
  local len = string.byte(bytes, 7)
  if len >= 0x80 then  -- a name longer than 127 bytes is none of ours
    return nil
  end
  return string.sub(bytes, 8, 7 + len)
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if not HEALTH[headers:get(":path")] then
    return
  end
  headers:remove("x-tensafe-service")
  local body = handle:body()
  if body == nil then
    return
  end
  local name = service_name(body:getBytes(0, body:length()))
  local short = name and string.match(name, "^tensafe%.api%.([%w_]+)%.v1%.[%w_]+$")
  if short and SERVICES[short] then
    -- A headers object does not outlive the wait for the body: ask for it again.
    handle:headers():replace("x-tensafe-service", short)
    handle:clearRouteCache()
  end
end
