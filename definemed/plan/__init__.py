"""`definemed plan`: what each stage asks the Ray cluster for, whether the cluster can hold it, and how long it
would run, before any GPU is booked.

One concern per module: `requests` (the resources each stage requests, computed by the same functions the
stages call), `cluster` (a cluster from a spec file or a live Ray), `fit` (placing those requests on the nodes),
`reserve` (doing it for real on a live cluster with placement groups and trivial actors), `project` (wall time
and GPU-hours from stated throughput figures), `report` (the table) and `cli` (the command).
"""
