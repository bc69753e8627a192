"""remem client: the NBD export a host swaps to, its pages kept on k page servers.

cli, service     flags; start (metrics, backend, listen), serve, drain or hand over
nbd/             the NBD server: handshake, transmission (parse, validate, dispatch),
                 drive (a request without a Task), buffers, replies, wire
remote/          the remote backend, in parts (remote/__init__.py: where a write goes)
links            one batching link per page server; mirror_link, placement_link
dealer, zmtp     the DEALER under every link (ZMTP from the loop, libzmq for Curve) and
                 the table of requests waiting for replies
sealing          AES-GCM of every page, nonces that never repeat
readahead        pages fetched ahead of sequential page-ins
handover         NBD connections passed to the next process through systemd's fd store
memory_backend   the NBD front end over a bytearray (tests, benchmarks)
"""
