"""Scale-out: spread a run's independent pieces of work over local processes or a Ray cluster.

``Workers`` says where work goes; a ``Pool`` runs a ``Job``'s tasks there and hands the results
back in task order, retrying workers that die. The Fisher stage (``fisher.parallel``) shards the
calibration samples with it, ``validate`` its configurations.
"""

from fitonnx.scale.pool import Job, Pool, warm_up
from fitonnx.scale.workers import LOCAL_RAY, Workers, threads_per_process

__all__ = ["LOCAL_RAY", "Job", "Pool", "Workers", "threads_per_process", "warm_up"]
