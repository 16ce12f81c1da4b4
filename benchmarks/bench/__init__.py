"""``distill bench``: speed against quality over a grid of models × steps × backends × precisions × batch sizes.

:mod:`.grid` (the configurations), :mod:`.speed` (latency, images/s, memory, the machine), :mod:`.quality`
(FD/KID/accuracy from cached per-seed samples, sharded with accelerate), :mod:`.report` (tables, the Pareto plot,
the headline ratio, the pick)."""
