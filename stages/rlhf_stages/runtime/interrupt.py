"""Stop *inside* a step on SIGTERM: the one helper PPO, GRPO, RLOO and ReST share.

A step of an on-policy method is long: it samples a whole batch (the long part on a real model),
then optimises. Waiting for the end of the step can outlast the Pod's grace period, so the stage
would be killed before it saves. :class:`StepGuard` puts a forward pre-hook on the input embedding
of the models it is given (every forward pass of a causal LM or classifier goes through it: each
generated token, each log-prob or reward pass). While a *phase* is armed and SIGTERM has arrived,
the next forward pass raises :class:`StepAborted` instead of running. So a sampling phase stops
after at most one token's forward pass, never half-way through one.

What is consistent to save after an abort (the caller's job, see each stage):

* A sampling phase runs before the step's first optimizer update, so the weights and optimizer
  state are exactly those of the last completed step; the sampled work is discarded and the step
  is sampled again after the restart (same step number: nothing skipped, nothing done twice).
* An optimisation phase is never aborted half-way through an update: a Trainer-based stage aborts
  only before ``optimizer.step()`` (gradients are not saved, so a half-accumulated step leaves no
  trace), PPO finishes its bounded optimisation epochs (see ``ppo_trainer``), ReST stops between
  updates and keeps its previous Improve checkpoint.

Multi-process stages must abort on every rank at the same point or a collective would hang: PPO
agrees on it with one all-reduce after its (communication-free) sampling phase; the Trainer-based
stages arm the guard only in a single process and otherwise stop at the end of the step, as before.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

# Debug knob: sleep this long in every forward pass of an armed phase, so that a tiny model's
# sampling is slow enough to be interrupted in tests. Never set in production.
FORWARD_DELAY_ENV = "RLHF_DEBUG_FORWARD_DELAY_S"


class StepAborted(Exception):
    """SIGTERM arrived during an armed phase: step ``step`` is abandoned (its work is discarded)."""

    def __init__(self, step: int, phase: str, seconds: float) -> None:
        super().__init__(f"SIGTERM during {phase} of step {step} ({seconds:.1f} s into it): step {step} is discarded")
        self.step = step
        self.phase = phase
        self.seconds = seconds


def _log(message: str) -> None:
    print(f"rlhf-stage: {message}", file=sys.stderr, flush=True)


def _hook_target(module: Any) -> Any:
    """The module every forward pass of ``module`` calls: its input embedding when it has one."""
    for candidate in (module, getattr(module, "model", None)):
        getter = getattr(candidate, "get_input_embeddings", None)
        if getter is not None:
            try:
                embedding = getter()
            except (AttributeError, NotImplementedError):
                continue
            if embedding is not None:
                return embedding
    return module


class StepGuard:
    """Arms SIGTERM aborts for phases of a step; see the module docstring.

    ``with guard.phase(step, "sampling"):`` arms it (``step`` is the 1-based step being computed)
    and logs one line naming the phase, so a log shows where a stage was when it was stopped.
    """

    def __init__(self, stop: threading.Event, modules: Iterable[Any], *, stage: str, total: int | None) -> None:
        self.stop = stop
        self.stage = stage
        self.total = total
        self.step = 0
        self.armed: str | None = None
        self._since = 0.0
        self._delay = float(os.environ.get(FORWARD_DELAY_ENV, "0") or 0)
        targets = {id(t): t for t in (_hook_target(m) for m in modules if m is not None)}
        self._handles = [t.register_forward_pre_hook(self._check) for t in targets.values()]

    def _check(self, module: Any, args: Any) -> None:
        if self.armed is None:
            return
        if self._delay:
            time.sleep(self._delay)
        if self.stop.is_set():
            raise StepAborted(self.step, self.armed, time.monotonic() - self._since)

    def arm(self, step: int, phase: str) -> None:
        self.step, self.armed, self._since = step, phase, time.monotonic()
        of = f"/{self.total}" if self.total else ""
        _log(f"{self.stage} step {step}{of}: {phase}")

    def disarm(self) -> None:
        self.armed = None

    @contextmanager
    def phase(self, step: int, phase: str) -> Iterator[None]:
        self.arm(step, phase)
        try:
            yield
        finally:
            self.disarm()

    def close(self) -> None:
        self.disarm()
        for handle in self._handles:
            handle.remove()
        self._handles = []


def trainer_callback(guard: StepGuard) -> Any:
    """A TrainerCallback that arms ``guard`` from the start of each optimizer step to its update.

    The Trainer's forward passes of a step (GRPO/RLOO: sampling, reference and old log-probs,
    the loss) all come before ``optimizer.step()``; between that update and ``global_step += 1``
    there is none, so an abort always leaves the state of step ``global_step``.
    """
    from transformers import TrainerCallback

    class _Arm(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            guard.arm(state.global_step + 1, "sampling and loss (before the update)")

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            guard.disarm()

    return _Arm()


def save_trainer_after_abort(ctx: Any, trainer: Any, callback: Any, aborted: StepAborted) -> Any:
    """Save the Trainer's last completed step (unless it is already saved); returns StageInterrupted.

    ``callback`` is the stage's ``checkpoints.StageCallback``: its ``on_save`` commits the
    checkpoint (rename out of ``.incoming``) exactly as after a scheduled save.
    """
    from rlhf_stages.runtime.context import StageInterrupted

    step = int(trainer.state.global_step)
    _log(f"{aborted}; keeping step {step}")
    if step == 0:
        return StageInterrupted(0, None)
    newest = callback.checkpoints.latest()
    if newest is None or newest[0] != step:
        started = time.monotonic()
        trainer._save_checkpoint(trainer.model, trial=None)  # what the Trainer itself calls to save
        trainer.control = callback.on_save(trainer.args, trainer.state, trainer.control)
        _log(f"checkpoint-{step} saved in {time.monotonic() - started:.1f} s")
    return StageInterrupted(step, f"checkpoint-{step}")
