"""The PPO loop: roll out, score, shape rewards, GAE, then clipped updates over mini-batches.

SIGTERM (see ``interrupt``): during the sampling phase of a step (generation, log-probs, values,
rewards: the long part) the step is abandoned after the current forward pass, the RNG streams are
put back as the step found them, and the last completed step is saved (unless it already was), so
the restarted run samples exactly what this one would have. During the optimisation epochs the
step is *finished*, then saved: they are bounded (``ppoEpochs x batchSize / miniBatchSize`` updates,
no sampling), and rolling them back instead would need a copy of the trainable weights and both
Adam moments taken before every step (3x the trainable state: ~170 GB for a full-weight 7B policy
and value model), paid on every step to serve the rare SIGTERM.

Data parallel: every rank runs this same loop on ``batchSize / world`` prompts of the same global
batch (all ranks derive the batch from the seed and the step, so nothing is communicated for it);
gradients are averaged by DDP (set up by accelerate), and advantage whitening, the statistics and
the KL controller use values all-reduced over the ranks so the ranks never diverge.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from rlhf_stages.methods.ppo import checkpoint as ckpt
from rlhf_stages.methods.ppo.advantages import (
    KLController,
    generalized_advantages,
    global_sum,
    masked_mean,
    masked_whiten,
    shaped_rewards,
)
from rlhf_stages.methods.ppo.losses import explained_variance, policy_loss, value_loss
from rlhf_stages.methods.ppo.models import PolicyAndValue, PPOModels
from rlhf_stages.methods.ppo.rollout import Rollout, generate, sample_budgets, token_logprobs, token_values
from rlhf_stages.runtime.checkpoint_dir import CheckpointDir
from rlhf_stages.runtime.interrupt import StepAborted, StepGuard
from rlhf_stages.runtime.models import load_trainable_state
from rlhf_stages.sampling.generate import eos_ids

log = logging.getLogger(__name__)


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work: CUDA runs asynchronously, so without the
    synchronisation a phase's time would land in whichever later phase first waits for a result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# What the watch's evaluate() tells the loop (PPOTrainer.train).
CONTINUE, END, ROLLBACK = 0, 1, 2


class PPOTrainer:
    def __init__(
        self,
        stage: Any,  # rlhf_api.stages.PPOStage
        models: PPOModels,
        tokenizer: Any,
        prompts: Sequence[Sequence[int]],
        *,
        accelerator: Any,
        checkpoints: CheckpointDir | None,
        guard: StepGuard | None = None,
    ) -> None:
        self.stage, self.models, self.tokenizer, self.prompts = stage, models, tokenizer, list(prompts)
        self.acc = accelerator
        self.checkpoints = checkpoints
        self.guard = guard  # aborts the sampling phase on SIGTERM (same on every rank, or on none)
        self.saved_step: int | None = None  # the step of the newest checkpoint written or resumed from
        world = accelerator.num_processes
        if stage.batch_size % world or stage.mini_batch_size % world:
            raise ValueError(f"batchSize and miniBatchSize must be multiples of the {world} processes")
        self.local_batch = stage.batch_size // world
        self.local_mini = stage.mini_batch_size // world
        self.eos_ids = eos_ids(models.policy, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.kl = KLController(stage.init_kl_coef, stage.adaptive_kl, stage.kl_target, stage.kl_horizon)

        module = PolicyAndValue(models.policy, models.value)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=0.0)
        self.model, self.optimizer = accelerator.prepare(module, optimizer)
        self.module = module  # unwrapped: rollouts and checkpoints use it directly
        # Independent streams per rank: ranks must sample different responses for their prompts.
        seed = stage.seed + accelerator.process_index
        self.generators = {
            "budgets": torch.Generator().manual_seed(seed),
            "shuffle": torch.Generator().manual_seed(seed),
        }
        torch.manual_seed(seed)
        self.step = 0
        self.history: list[dict[str, float]] = []
        # Where the last step's time went (seconds): generation, then the forward passes that score
        # it (log-probs of policy and reference, values, reward), then the PPO updates.
        self.phase_seconds: dict[str, float] = {}

    # ---------------------------------------------------------------- data

    def _batch_prompts(self, step: int) -> list[Sequence[int]]:
        """This rank's share of the global batch of ``step``: epochs are seeded permutations."""
        n, size = len(self.prompts), self.stage.batch_size
        picked: list[int] = []
        start = step * size
        while len(picked) < size:
            epoch, offset = divmod(start + len(picked), n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.stage.seed * 100003 + epoch))
            picked += order[offset : offset + size - len(picked)].tolist()
        rank = self.acc.process_index
        return [self.prompts[i] for i in picked[rank * self.local_batch : (rank + 1) * self.local_batch]]

    # ---------------------------------------------------------------- one step

    @torch.no_grad()
    def rollout(self, prompts: Sequence[Sequence[int]]) -> tuple[Rollout, dict[str, torch.Tensor]]:
        """Sample and score a batch; raises StepAborted (on every rank) when SIGTERM interrupts it."""
        st, gen = self.stage, self.stage.generation
        rng = ckpt.rng_state(self.generators) if self.guard is not None else None
        aborted: StepAborted | None = None
        try:
            # No communication in here (the models are used unwrapped), so a rank may leave early.
            with self.guard.phase(self.step + 1, "sampling") if self.guard is not None else nullcontext():
                budgets = sample_budgets(
                    self.generators["budgets"], len(prompts), st.response_length.min, st.response_length.max
                )
                policy = self.module.policy
                began = _clock(self.acc.device)
                batch = self.sample(policy, prompts, budgets)
                sampled = _clock(self.acc.device)
                logprobs, entropy = token_logprobs(policy, batch, gen.temperature, with_entropy=True)
                with self.models.reference_context():
                    ref_logprobs, _ = token_logprobs(self.models.reference_model(), batch, gen.temperature)
                values = token_values(self.module.value, batch)
                raw_scores = self.models.reward.score(batch, self.tokenizer)
                self.phase_seconds = {
                    "sampling_seconds": sampled - began,
                    "scoring_seconds": _clock(self.acc.device) - sampled,
                }
        except StepAborted as exc:
            aborted = exc
        if rng is not None:
            (aborting,) = global_sum(torch.tensor(float(aborted is not None)))  # every rank stops, or none
            if aborting > 0:
                ckpt.restore_rng(rng, self.generators)  # the restarted step samples what this one would have
                raise aborted or StepAborted(self.step + 1, "sampling (SIGTERM seen by another process)", 0.0)
        assert entropy is not None
        scores = raw_scores.clone()
        if st.missing_eos_penalty is not None:
            scores = scores - st.missing_eos_penalty * (~batch.ended_with_eos).float()
        mask = batch.response_mask
        rewards, kl = shaped_rewards(logprobs, ref_logprobs, mask, scores, self.kl.value)
        advantages, returns = generalized_advantages(values, rewards, mask, st.gamma, st.lam)
        if st.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        data = dict(
            logprobs=logprobs,
            values=values,
            advantages=advantages,
            returns=returns,
            scores=scores,
            raw_scores=raw_scores,
            kl=kl,
            entropy=entropy,
        )
        return batch, data

    def sample(self, policy: Any, prompts: Sequence[Sequence[int]], budgets: Sequence[int]) -> Rollout:
        """Sample answers with the stage's generation settings: the one sampling call of PPO (the
        rollout, the final score and the watch's evaluations must sample alike)."""
        gen = self.stage.generation
        return generate(
            policy,
            prompts,
            budgets,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            temperature=gen.temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            extra=dict(gen.extra),
        )

    def optimise(self, batch: Rollout, data: dict[str, torch.Tensor]) -> dict[str, float]:
        st = self.stage
        totals: dict[str, float] = {}
        updates = 0
        policy_params = [p for p in self.module.policy.parameters() if p.requires_grad]
        value_params = [p for p in self.module.value.parameters() if p.requires_grad]
        self.model.train()
        self.module.policy.eval()  # dropout off: the ratio must be 1 before the first update
        self.module.value.eval()
        noticed = False
        for epoch in range(st.ppo_epochs):
            order = torch.randperm(self.local_batch, generator=self.generators["shuffle"])
            for start in range(0, self.local_batch, self.local_mini):
                if not noticed and self.guard is not None and self.guard.stop.is_set():
                    noticed = True
                    left = (st.ppo_epochs - epoch) * (self.local_batch // self.local_mini) - start // self.local_mini
                    log.warning(
                        "SIGTERM during the optimisation of step %d: finishing its %d remaining updates, then saving",
                        self.step + 1,
                        left,
                    )
                idx = order[start : start + self.local_mini].to(batch.query.device)
                sub, mask = batch.select(idx), batch.response_mask[idx]
                logprobs, values = self.model(sub, st.generation.temperature)
                pl = policy_loss(logprobs, data["logprobs"][idx], data["advantages"][idx], mask, st.clip_range)
                vl = value_loss(values, data["values"][idx], data["returns"][idx], mask, st.clip_range_value)
                loss = pl.loss + st.value_loss_coef * vl.loss
                self.optimizer.zero_grad(set_to_none=True)
                self.acc.backward(loss)
                # Clipped apart: the critic's (often much larger) gradient must not shrink the policy's step.
                torch.nn.utils.clip_grad_norm_(policy_params, st.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(value_params, st.max_grad_norm)
                self.optimizer.step()
                for name, v in (
                    ("policy_loss", pl.loss),
                    ("value_loss", vl.loss),
                    ("clip_frac", pl.clip_frac),
                    ("approx_kl", pl.approx_kl),
                    ("value_clip_frac", vl.clip_frac),
                ):
                    totals[name] = totals.get(name, 0.0) + float(v.detach())
                updates += 1
        names = list(totals)
        summed = global_sum(*(torch.tensor(totals[n] / updates) for n in names))
        return {n: float(s) / self.acc.num_processes for n, s in zip(names, summed, strict=True)}

    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        batch, data = self.rollout(self._batch_prompts(self.step))
        kl_coef = self.kl.value
        updating = _clock(self.acc.device)
        stats = self.optimise(batch, data)
        update_seconds = _clock(self.acc.device) - updating
        mask, n = batch.response_mask, torch.tensor(float(self.local_batch))
        seq_kl = data["kl"].sum(1)
        s_sum, s_sq, raw, kl_sum, nsr, length, eos, ent, tokens, count = global_sum(
            data["scores"].sum(),
            (data["scores"] ** 2).sum(),
            data["raw_scores"].sum(),
            seq_kl.sum(),
            (-kl_coef * seq_kl).sum(),
            batch.lengths.sum(),
            batch.ended_with_eos.float().sum(),
            data["entropy"].sum(),
            mask.sum(),
            n,
        )
        mean_kl = float(kl_sum / count)
        self.kl.update(mean_kl, self.stage.batch_size)
        reward_mean = float(s_sum / count)
        stats.update(
            reward_mean=reward_mean,
            reward_std=max(float(s_sq / count) - reward_mean**2, 0.0) ** 0.5,
            rm_score_mean=float(raw / count),
            kl=mean_kl,
            kl_coef=kl_coef,
            non_score_reward=float(nsr / count),
            entropy=float(ent / tokens),
            explained_variance=float(explained_variance(data["values"], data["returns"], mask)),
            value_mean=float(masked_mean(data["values"], mask, across_ranks=True)),
            response_length=float(length / count),
            eos_rate=float(eos / count),
            step_seconds=time.perf_counter() - started,
            update_seconds=update_seconds,
            **self.phase_seconds,
        )
        self.step += 1
        self.history.append({"step": self.step, **stats})
        return stats

    def restore_policy(self, state: dict[str, torch.Tensor], kl_factor: float) -> None:
        """A watch rollback (every rank): the policy's trainable weights from ``state``, the
        optimizer's moments cleared (they point along the path that led to the alarm; Adam starts
        them afresh) and the KL penalty strengthened. The value model and the step count stay."""
        load_trainable_state(self.module.policy, state)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        inner.state.clear()
        self.kl.strengthen(kl_factor)

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> None:
        """Collective: every rank calls it at the same step."""
        if self.checkpoints is None:
            return
        acc, tmp = self.acc, self.checkpoints.staging(self.step)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            extra = {"kl_controller": self.kl.state_dict(), "history": self.history}
            ckpt.write_shared(tmp, self.module, self.optimizer, self.step, extra)
        ckpt.write_rank(tmp, acc.process_index, self.generators)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.checkpoints.publish(self.step)
            log.info("checkpoint at step %d", self.step)
        acc.wait_for_everyone()
        self.saved_step = self.step

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint, if any; True when one was loaded."""
        newest = self.checkpoints.latest() if self.checkpoints is not None else None
        if newest is None:
            return False
        path = newest[1]
        extra = ckpt.load(path, self.acc.process_index, self.module, self.optimizer, self.generators)
        self.step = int(extra["step"])
        self.kl.load_state_dict(extra["kl_controller"])
        self.history = list(extra["history"])
        self.saved_step = self.step
        log.info("resumed from %s", path)
        return True

    # ---------------------------------------------------------------- loop

    def train(
        self,
        should_stop: Callable[[], bool],
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        evaluate: Callable[[int], int] | None = None,
        rollback: Callable[[], None] | None = None,
    ) -> bool:
        """Run to totalSteps; returns False when stopped early (a checkpoint was saved if possible).

        ``evaluate(step)`` runs after every step (on every rank; see ``watch``) and returns one of
        ``CONTINUE``, ``END`` (training ends there as finished: a reward-hacking alarm with
        ``watch.action: stop``) or ``ROLLBACK``, when every rank then calls ``rollback()`` and trains on.
        At most one rank (rank 0, which evaluates) returns anything but ``CONTINUE``.
        """
        st = self.stage
        while self.step < st.total_steps:
            try:
                stats = self.train_step()
            except StepAborted as aborted:
                log.warning("%s; saving step %d", aborted, self.step)
                if self.step > 0 and self.saved_step != self.step:
                    started = time.perf_counter()
                    self.save_checkpoint()
                    log.warning("checkpoint-%d saved in %.1f s", self.step, time.perf_counter() - started)
                return False
            if on_step is not None:
                on_step(self.step, stats)
            if evaluate is not None:
                (verdict,) = global_sum(torch.tensor(float(evaluate(self.step))))  # every rank learns rank 0's
                if int(verdict) == END:
                    return True
                if int(verdict) == ROLLBACK:
                    if rollback is None:
                        raise RuntimeError("evaluate asked for a rollback, but none was given")
                    rollback()
            (stop,) = global_sum(torch.tensor(float(should_stop())))  # every rank must agree to stop
            if self.step % st.save_freq == 0 or (stop and self.step < st.total_steps):
                self.save_checkpoint()
            if stop and self.step < st.total_steps:
                return False
        return True
