"""remem page server: stores clients' 4 KiB pages in a RAM arena on a memory-donor host.

    cli, service   flags; open the arena, bind, register with placement, serve, drain
    server         the loop: requests in, handlers (put, get, delete, inventory, slab orders)
    (its data socket is remem_common.router: ZMTP from the loop, or libzmq for Curve)
    slab_push      copies of slabs sent straight to other page servers (re-replication)
    registration   the heartbeat to placement, on its own thread

The page store, one facade over three parts:

    store.py    PageStore: put/get/delete of page batches and slab drop/list, all or nothing
    arena.py    the arena file: layout, header, mapping, commit and punch of region memory
    index.py    the slab index (which slot holds each page) and the tenant table
    regions.py  the slot allocator: free slots per 1 MiB region, regions' commitment, owners
"""
