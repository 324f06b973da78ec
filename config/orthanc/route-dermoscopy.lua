-- Orthanc auto-routing for dermnode: send dermoscopy images, and only those, to the node.
--
-- Install: add this file to "LuaScripts" in orthanc.json, and declare the node in
-- "DicomModalities" as "dermnode" (see orthanc.json beside this file).
--
-- Routed: Dermoscopic Photography Image Storage and VL Photographic Image Storage
-- instances that are ORIGINAL images (not derived ones) and did not come from dermnode.
-- dermnode itself also ignores its own results, so a routing mistake cannot loop.

local DERMOSCOPY = {
  ['1.2.840.10008.5.1.4.1.1.77.1.7'] = true,  -- Dermoscopic Photography Image Storage
  ['1.2.840.10008.5.1.4.1.1.77.1.4'] = true,  -- VL Photographic Image Storage
}
local NODE_MODALITY = 'dermnode'   -- the name in DicomModalities
local NODE_AET = 'DERMNODE'        -- dermnode's AE title (its results arrive from it)

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin ~= nil and origin['RequestOrigin'] == 'DicomProtocol' and origin['RemoteAet'] == NODE_AET then
    return  -- a result sent back by dermnode
  end
  local sopClass = tags['SOPClassUID'] or metadata['SopClassUid']
  if not DERMOSCOPY[sopClass] then
    return
  end
  local imageType = tags['ImageType'] or ''
  if string.sub(imageType, 1, 7) == 'DERIVED' then
    return
  end
  print('dermnode routing: sending instance ' .. instanceId .. ' to ' .. NODE_MODALITY)
  SendToModality(instanceId, NODE_MODALITY)
end
