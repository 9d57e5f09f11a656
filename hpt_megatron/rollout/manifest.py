"""Incremental check of streamed weights against the export manifest: a receiver that loads
buckets as they arrive (vLLM) cannot wait for the whole model before verifying it."""

from __future__ import annotations

from hpt_megatron.rollout.base import Bucket


class ManifestTracker:
    def __init__(self, manifest):
        self.expected = manifest.entries
        self.seen: set[str] = set()

    def check(self, bucket: Bucket) -> None:
        for name, tensor in bucket:
            if name not in self.expected:
                raise ValueError(f"weight sync: unexpected tensor {name!r} (not in the export manifest)")
            if name in self.seen:
                raise ValueError(f"weight sync: tensor {name!r} was sent twice")
            shape, dtype = self.expected[name]
            got = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            if got != (tuple(shape), dtype):
                raise ValueError(
                    f"weight sync: {name!r} is {list(got[0])} {got[1]}, the manifest says {list(shape)} {dtype}"
                )
            self.seen.add(name)

    def finish(self) -> None:
        missing = [n for n in self.expected if n not in self.seen]
        if missing:
            raise ValueError(
                f"weight sync: {len(missing)} tensors of the manifest never arrived: {missing[:8]}"
            )
