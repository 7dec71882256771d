-- Argo CD health check for rlhf-operator.io/RLHFRun (Lua 5.1, as Argo CD runs it).
-- Install: the key resource.customizations.health.rlhf-operator.io_RLHFRun in argocd-cm
-- (argocd-cm.yaml beside this file carries this very script; a test keeps them identical).
--
--   Healthy      the run succeeded (its output model is ready)
--   Degraded     the run failed (the Failed condition's reason and message say why)
--   Suspended    spec.suspend is true and the operator has suspended the stage Jobs
--   Progressing  pending or running, or the operator has not yet seen the latest spec
local hs = {}

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ and c.status == "True" then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the run"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
  return hs
end

local failed = condition(status, "Failed")
if failed ~= nil or status.phase == "Failed" then
  hs.status = "Degraded"
  local where = ""
  if status.currentStage ~= nil then
    where = "stage " .. status.currentStage .. " failed: "
  end
  hs.message = where .. describe(failed, "the run failed")
  return hs
end

if condition(status, "Succeeded") ~= nil or status.phase == "Succeeded" then
  hs.status = "Healthy"
  if status.outputModel ~= nil then
    hs.message = "Succeeded: " .. status.outputModel
  else
    hs.message = "Succeeded"
  end
  return hs
end

if condition(status, "Suspended") ~= nil or status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(condition(status, "Suspended"), "Suspended")
  return hs
end

hs.status = "Progressing"
if status.progress ~= nil then
  hs.message = status.phase .. " " .. status.progress
else
  hs.message = status.phase
end
return hs
