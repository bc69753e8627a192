"""`make bench`: every benchmark of remem in one run, written to BENCHMARKS.md and a chart.

    python -m tests.bench [--runtime 5] [--rounds 2] [--out BENCHMARKS.md] [--parts ...]

The parts, in the order they run (suite.py):

- fio (fio_rows.py): `nbdkit memory` (the C reference), `remem up` at k=1 and at k=2, and
  `remem up --no-mirror` at k=2 (write workloads only: what the mirror costs), side by side
  on Unix sockets; the same fio jobs (`--ioengine=nbd`) against each, rounds rotating which
  server goes first. The plumbing is remem_client.bench_nbd's.
- cluster (cluster_figures.py), on the k=2 cluster once fio is done: the client's location
  metadata per GiB of device, then a page server SIGKILLed under a fio load (the longest
  request is the failover stall) and placement re-replicating its slabs (MB/s).
- pageserver: `remem_pageserver.bench` (batched PUT/GET, RAM overhead with 1M pages).
- swap (swap.py, root): the kernel swaps a hog through nbdfuse and a loop device to `nbdkit
  memory` and to `remem up`, paging it back in sequential and in random order
  (tests/system/kernel_swap.py).

report.py turns the results into BENCHMARKS.md (machine, versions, date, the tables, each
target of issue 14 beside the row that measures it) and a PNG chart beside it.
"""
