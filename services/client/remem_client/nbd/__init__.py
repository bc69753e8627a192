"""remem's NBD server (fixed newstyle): the block device the kernel's nbd-client swaps to.

A request's way through the package, one module per step:

    socket   connection.py    accept, handshake (handshake.py), pausing, closing, shutdown
      ▼      buffers.py       receive buffers (pinned by suspended writes), payload pool
    parse    transmission.py  parse ▶ validate ▶ dispatch, flow control
      ▼
    backend  remem_client.backend (memory or remote); a call that suspends is carried
      ▼      on by drive.py (without a Task for a task_free backend)
    reply    replies.py       reply packing, as few transport writes as possible

wire.py holds every constant and struct layout of the protocol.
"""
