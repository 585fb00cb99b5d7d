"""SIGTERM -> save and stop at a step boundary, agreed across hosts (used by `embedder.train.loop`)."""
from __future__ import annotations

import signal

import jax


class Preemption:
    """Turns SIGTERM into a stop at a step boundary, the same step on every host.

    One process: a Python SIGTERM handler sets a flag the loop checks after each
    step. Several processes (after `jax.distributed.initialize`): SIGTERM may reach
    one host only, or hosts at different steps, and a save is a collective, so the
    stop must be agreed. JAX's preemption service (its C++ SIGTERM notifier and the
    coordination service) does that: `check(step)` turns true on every host at the
    same step (`multihost_utils.reached_preemption_sync_point`); no Python handler
    is installed then, as it would replace the notifier.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._synced = False

    def __enter__(self):
        from jax._src import distributed

        if jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None:
            self._synced = True
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def check(self, step: int) -> bool:
        """Called once after every train step; true when the run should save and stop."""
        if self._synced and not self.requested:
            from jax.experimental import multihost_utils

            self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
