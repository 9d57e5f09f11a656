"""Workers and how the driver reaches them: in-process for one rank, Ray actors otherwise.
``ray_cluster`` and ``engine_pool`` are the only modules of the package that import ray."""

from hpt_megatron.cluster.base import Cluster, LocalCluster


def make_cluster(cfg) -> Cluster:
    """One in-process worker, or Ray actors (several ranks, an existing Ray cluster, or asked for)."""
    if cfg.cluster.world_size == 1 and cfg.cluster.ray_address is None and not cfg.cluster.use_ray:
        return LocalCluster(cfg)
    from hpt_megatron.cluster.ray_cluster import RayCluster

    return RayCluster(cfg)


__all__ = ["Cluster", "LocalCluster", "make_cluster"]
