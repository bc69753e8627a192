"""The remote backend: the device's pages on k page servers, and a copy on the local mirror.

Where a write goes (the kernel swapping out one 4 KiB page):

1. `nbd.transmission` reads NBD_CMD_WRITE off the NBD socket, checks it and calls
   `RemoteBackend.pwrite` (`remote.backend`, the facade), with the payload still in the
   receive buffer.
2. The read-ahead filter (`readahead.ReadAheadFilter`) drops the page from its ring, and
   `remote.ordering` registers the write: it runs at once unless an earlier partial write
   of the page could undo it.
3. `remote.fallback` queues the page to the mirror (write-behind) and hands it to
   `remote.writes`, which seals it (AES-GCM, `sealing`), asks `remote.slabmap` for the
   slab's live replicas (placement allocates them on the slab's first write) and submits
   one put per replica to its link (`remote.linkpool`).
4. Each page server link (`links.PageServerLink`) gathers the puts of this socket callback
   into one `put_pages_request`; the page server (`remem_pageserver.server`) checks the
   checksums and copies the pages into its RAM arena under /dev/shm
   (`remem_pageserver.store.PageStore.put`), then replies.
5. Once every live replica acknowledged, the page is marked written (`remote.pagemap`) and
   the NBD reply goes out. If no replica stored it (network down), the page goes to the
   mirror alone, durably, marked unreplicated; `remote.resync` copies it to the replicas
   when they answer again.

A read takes the reverse way: the read-ahead ring, else one replica (`remote.reads`),
failing over to the others, then to the mirror (`remote.fallback`); a replica that served a
page damaged gets the good copy back (`remote.repair`).

Modules, each importing only modules listed before it: `stats`, `pagemap` (bitmaps),
`linkpool` (the only one that names a link class), `slabmap` (replicas and their health;
placement writes here), `ordering`, `core` (what the parts share), `repair`, `reads`,
`writes`, `fallback`, `rebuild` (of the mirror), `resync`, `backend` (the facade),
`assembly` (`open_remote`: placement link, mirror link, metrics). This file imports none
of them. The unit tests run the parts over fake page servers (tests/unit/remote_fakes.py).
"""
