"""remem's wire protocol: one module per service boundary, all sharing `envelope` and `framing`.

| module                | boundary                          |
|-----------------------|-----------------------------------|
| `client_pageserver`   | client -> page server (data plane) |
| `pageserver_placement`| page server <-> placement         |
| `pageserver_peer`     | page server -> page server (slab push) |
| `client_placement`    | client <-> placement (allocation, slab map, failure reports) |
| `admin_placement`     | `remem status` / `remem drain` -> placement |
| `client_mirror`       | client -> mirror (write-behind copy, network-down reads, resync state) |

Every module's docstring is its spec. `PROTOCOL_VERSION` in `envelope` is the one version of
the whole wire; bump it on any incompatible change and translate old shapes in `adapt()`.
"""
