-- Orthanc -> medsr-node routing (docs/pacs.md). Needs in orthanc.json:
--   "DicomModalities" : { "medsr" : [ "MEDSR", "127.0.0.1", 11112 ] },
--   "UserMetadata" : { "MedsrRouted" : 4242 },
--   "LuaScripts" : [ "/etc/orthanc/medsr-route.lua" ]
-- When a study is stable, each of its CR/DX/CT/MR series not yet routed is sent to medsr-node as one
-- asynchronous store job (a failed job, e.g. while the node restarts, can be resubmitted: see
-- docs/pacs.md). medsr-node sends the derived series back into the same study; those come from its
-- AE title and are never routed again.

local NODE = 'medsr'            -- the DicomModalities entry of medsr-node
local NODE_AET = 'MEDSR'        -- its AE title (listen.ae_title)
local MODALITIES = { CR = true, DX = true, CT = true, MR = true }  -- CT/MR: [volumes] of the node

function OnStableStudy(studyId, tags, metadata)
  for _, series in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local modality = series['MainDicomTags']['Modality']
    local first = series['Instances'][1]
    if MODALITIES[modality] and first ~= nil then
      local origin = ParseJson(RestApiGet('/instances/' .. first .. '/metadata?expand'))
      local routed = ParseJson(RestApiGet('/series/' .. series['ID'] .. '/metadata?expand'))
      if origin['RemoteAET'] ~= NODE_AET and routed['MedsrRouted'] == nil then
        RestApiPost('/modalities/' .. NODE .. '/store',
                    DumpJson({ Resources = { series['ID'] }, Asynchronous = true }, true))
        RestApiPut('/series/' .. series['ID'] .. '/metadata/MedsrRouted', 'yes')
      end
    end
  end
end
