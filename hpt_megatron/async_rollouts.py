"""Asynchronous rollouts (``rollout.async_staleness = k > 0``): the engines generate the rollouts of
step t + k while the actor trains step t.

Every rank's engine is owned by one thread of its worker, which runs the engine's work in the order
it was queued. At the start of step t the driver queues step t + k's generation, then waits for step
t's (queued k steps earlier); at the end of step t it snapshots the actor's weights and queues their
load. So the generation of step s runs on the weights of the actor after ``version = max(s - k,
first step)`` steps, and a step trains on rollouts at most k updates old (``rollout/staleness``)::

    driver (actor)   | train 0 | sync θ1 | train 1 | sync θ2 | train 2 | ...
    engine thread    | gen 0 (θ0) | gen 1 (θ0) | load θ1 | gen 2 (θ1) | load θ2 | gen 3 (θ2) ...

Each queued load is checked like a synchronous one: the engine scores the probe sequence and
compares it with the actor's log-probs of the same weights; a stale engine fails every later
generation, and the run stops at the next collect. Prompts are drawn from the sampler in step order
at queue time, so a step trains on the same prompts as in synchronous mode. A checkpoint waits for
the queued generations and stores them (token ids, log-probs, versions): a resumed run trains on
exactly the rollouts the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hpt_megatron.rollout import Completion


@dataclass
class Rollout:
    """One step's prompts and what the engines made of them."""

    step: int
    indices: list[int]  # the prompts' rows in the train split
    n: int  # rollouts per prompt (0: the step's algorithm samples none)
    version: int  # the weights that sampled them: the actor after this many steps
    completions: list[list[Completion]] | None = None  # None while still queued
    probe: dict[str, float] = field(default_factory=dict)  # the check of those weights' load

    @classmethod
    def draw(cls, run, step: int, version: int) -> Rollout:
        """The step's prompts from the sampler (in step order), still without completions unless
        the step's algorithm samples none."""
        indices = next(run.data.sampler)
        n = run.algo_at(step).gate.rollouts_per_prompt(run.cfg.rollout.n)
        return cls(step, indices, n, version, completions=None if n else [[] for _ in indices])

    def prompt_ids(self, run) -> list[list[int]]:
        return [it.prompt_ids for it in run.data.train.batch(self.indices)]

    @property
    def staleness(self) -> int:
        return self.step - self.version

    def state_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["completions"] = [[dataclasses.asdict(c) for c in cs] for cs in self.completions]
        return d

    @classmethod
    def from_state_dict(cls, d: dict) -> Rollout:
        completions = [[Completion(**c) for c in cs] for cs in d["completions"]]
        return cls(**{**d, "completions": completions})


class RolloutsAhead:
    """The queue of generations ahead of training, ``staleness`` steps deep."""

    def __init__(self, run, staleness: int, sampling_params):
        self.run, self.k, self.params = run, staleness, sampling_params
        self.queued: dict[int, Rollout] = {}
        self.probes: dict[int, dict[str, float]] = {}  # weights version -> its load's probe check
        self.started = False

    def take(self, step: int) -> Rollout:
        """Step ``step``'s rollouts; first queues the generations up to step + k (on the weights the
        engines will hold by then: the actor's now)."""
        if not self.started:
            # the engines already hold the actor's weights (checked at start-up or after a resume);
            # load them once more through the queue, so this version's probe is reported like
            # every later one (identically in a fresh, an uninterrupted and a resumed run)
            self.run.cluster.submit_sync(step)
            self.started = True
        last = max(self.queued, default=step - 1)
        for s in range(last + 1, min(step + self.k, self.run.total_steps - 1) + 1):
            self._submit(s, version=step)
        rollout = self.queued.pop(step)
        if rollout.completions is None:
            self._collect(rollout)
        return rollout

    def weights_updated(self, version: int) -> dict[str, float]:
        """After an update: queue the load of the actor's new weights behind the queued generations."""
        return self.run.cluster.submit_sync(version)

    def _submit(self, step: int, version: int) -> None:
        run = self.run
        rollout = Rollout.draw(run, step, version)
        if rollout.n:
            run.cluster.submit_generate(step, rollout.prompt_ids(run), self.params(run, rollout.n, step))
        self.queued[step] = rollout

    def _collect(self, rollout: Rollout) -> None:
        rollout.completions, probes = self.run.cluster.collect_generate(rollout.step)
        self.probes.update(probes)
        # FIFO: the load of the weights this generation ran on finished before it
        rollout.probe = self.probes.get(rollout.version, {})
        oldest = min([r.version for r in self.queued.values()] + [rollout.version])
        self.probes = {v: p for v, p in self.probes.items() if v >= oldest}

    # ---- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> list[dict]:
        """The queued steps' rollouts (waiting for them), for a checkpoint."""
        for rollout in self.queued.values():
            if rollout.completions is None:
                self._collect(rollout)
        return [r.state_dict() for r in sorted(self.queued.values(), key=lambda r: r.step)]

    def load_state_dict(self, state: list[dict]) -> None:
        self.queued = {d["step"]: Rollout.from_state_dict(d) for d in state}

    def close(self) -> None:
        """Drop the generations that have not started (the run ends or stops)."""
        self.run.cluster.cancel_generations()
        self.queued.clear()
