"""Over-the-air updates, the site's side: the registry client (manifest, site reports),
signature check, resumable verified fetch, install, and the refused-versions store. Used
by the edge node's model updater and the router's policy updater alike.

The artifact format (``ota.artifacts``) and the signature document (``ota.signatures``)
are shared with the registry server, which imports them from here: a service never
imports the registry's package."""
