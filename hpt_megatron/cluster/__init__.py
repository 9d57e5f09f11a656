"""Workers and how the driver reaches them: in-process for one rank, Ray actors otherwise.
``ray_cluster`` is the only module of the package that imports ray."""

from hpt_megatron.cluster.base import Cluster, LocalCluster, make_cluster

__all__ = ["Cluster", "LocalCluster", "make_cluster"]
