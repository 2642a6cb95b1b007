"""The batch job (`navit-pack pack`): plan, decide, fill and write sharded output, here or on Beam.

  job    the job model (PackJob), its pure layout (groups, order, shards) and the steps every runner
         calls in the same order: decide_group, write_group, finalize
  local  the local runner: listing and filling in one pool of worker processes, each input read once
  beam   the same steps as Beam transforms (Dataflow, Flink, Spark, Dask, DirectRunner)
  run    run_pack: claims the output folder and runs one of them
  plan_job  `navit-pack plan` on Beam: headers read by the workers, the stream's global plan decided by one
"""
from .job import PackJob, images_seen, layout, order_fraction, packing_group
from .run import run_pack

__all__ = ["PackJob", "run_pack", "layout", "packing_group", "order_fraction", "images_seen"]
