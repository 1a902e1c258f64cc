-- Orthanc auto-routing for the dicom-node compose demo (deploy/docker-compose.yaml).
--
-- Every study that becomes stable in Orthanc (no new instance for StableAge seconds) is sent to
-- the node in one C-STORE association, except the instances the node itself stored: its
-- results land in the source's study, make that study stable again, and would otherwise be
-- sent straight back to the node.

local NODE_MODALITY = 'dicomnode'  -- its key in Orthanc's DicomModalities
local NODE_AET = 'DICOMNODE'       -- the AE title the node sends results with (its scp.ae_title)

-- Orthanc IDs of instances stored since their study was last routed. In memory only: a study
-- still waiting for its stable event when Orthanc restarts is not routed; send it by hand
-- (Orthanc Explorer: "Send to DICOM modality", or POST /modalities/dicomnode/store).
local pending = {}

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin == nil or origin['RemoteAet'] ~= NODE_AET then
    pending[instanceId] = true
  end
end

function OnStableStudy(studyId, tags, metadata)
  local resources = {}
  for _, instance in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/instances'))) do
    if pending[instance['ID']] then
      table.insert(resources, instance['ID'])
      pending[instance['ID']] = nil
    end
  end
  if #resources > 0 then
    print('dicom-node autoroute: study ' .. studyId .. ': ' .. #resources ..
          ' instance(s) to ' .. NODE_MODALITY)
    -- Asynchronous: a job in Orthanc (visible under /jobs), not a wait inside this callback.
    RestApiPost('/modalities/' .. NODE_MODALITY .. '/store',
                DumpJson({ Resources = resources, Synchronous = false }, true))
  end
end
