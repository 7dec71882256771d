"""PPO building blocks against hand-computed references (fast; no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from rlhf_stages.methods.ppo import checkpoint as ckpt  # noqa: E402
from rlhf_stages.methods.ppo.advantages import (  # noqa: E402
    KLController,
    generalized_advantages,
    global_sum,
    masked_mean,
    masked_whiten,
    shaped_rewards,
)
from rlhf_stages.methods.ppo.losses import policy_loss, value_loss  # noqa: E402
from rlhf_stages.methods.ppo.rollout import Rollout, generate, last_token_scores, token_logprobs, token_values  # noqa: E402


def _naive_gae(values: list[float], rewards: list[float], gamma: float, lam: float) -> list[float]:
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_matches_the_recursion_per_response_and_ignores_padding() -> None:
    values = torch.tensor([[0.5, 0.2, -0.1, 0.3], [1.0, 2.0, 9.0, 9.0]])
    rewards = torch.tensor([[0.0, 0.1, 0.0, 1.0], [0.2, -1.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = generalized_advantages(values, rewards, mask, gamma=0.9, lam=0.8)
    expected0 = _naive_gae([0.5, 0.2, -0.1, 0.3], [0.0, 0.1, 0.0, 1.0], 0.9, 0.8)
    expected1 = _naive_gae([1.0, 2.0], [0.2, -1.0], 0.9, 0.8)  # padding must not leak in
    assert torch.allclose(adv[0], torch.tensor(expected0), atol=1e-6)
    assert torch.allclose(adv[1, :2], torch.tensor(expected1), atol=1e-6) and adv[1, 2:].abs().sum() == 0
    assert torch.allclose(ret, (adv + values) * mask)


def test_shaped_rewards_put_the_score_on_the_last_real_token() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -3.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    rewards, kl = shaped_rewards(logprobs, ref, mask, torch.tensor([2.0, -1.0]), kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.5], [-0.5, 2.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 2.0 - 0.05], [0.05, -1.0 - 0.2, 0.0]]))


def test_kl_controller_moves_towards_target_with_clipped_steps() -> None:
    ctl = KLController(value=0.2, adaptive=True, target=6.0, horizon=100)
    ctl.update(observed_kl=60.0, num_rollouts=10)  # error clipped to +20%
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 10 / 100))
    ctl.update(observed_kl=3.0, num_rollouts=10)  # below target: decrease (-20% clip)
    assert ctl.value == pytest.approx(0.2 * 1.02 * 0.98)
    fixed = KLController(value=0.2, adaptive=False, target=6.0, horizon=100)
    fixed.update(100.0, 10)
    assert fixed.value == 0.2
    restored = KLController(0.0, True, 6.0, 100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_whitening_is_over_masked_entries() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    w = masked_whiten(x, mask)
    assert float(masked_mean(w, mask)) == pytest.approx(0.0, abs=1e-6)
    assert torch.all(w[1, 1:] == 0)
    assert float(((w * mask) ** 2).sum() / 3) == pytest.approx(1.0, abs=1e-5)  # unbiased var 1 over 4 entries


def test_global_sum_takes_statistics_from_the_accelerator_with_cpu_counters() -> None:
    # The trainer sums GPU statistics with counters made on the CPU (torch.tensor(batch size)); on the
    # first GPU run that stack failed ("Expected all tensors to be on the same device"). The meta device
    # stands in for the GPU here: stacking meta with CPU tensors fails the same way.
    summed = global_sum(torch.ones((), device="meta"), torch.tensor(2.0))
    assert [t.device.type for t in summed] == ["meta", "meta"]
    assert [float(t) for t in global_sum(torch.tensor(1.0), torch.tensor(2.0))] == [1.0, 2.0]


def test_policy_loss_clips_only_in_the_advantage_direction() -> None:
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]])
    mask = torch.ones(1, 4)
    out = policy_loss(new, old, adv, mask, clip_range=0.2)
    # ratio 1.5 with A>0: clipped to 1.2; ratio 1.5 with A<0: unclipped (pessimistic); 0.5 with A<0: clipped 0.8.
    assert float(out.loss) == pytest.approx((-1.2 + 1.5 + 0.8 - 2.0) / 4)
    assert float(out.clip_frac) == pytest.approx(0.5)
    same = policy_loss(old, old, adv, mask, 0.2)
    assert float(same.loss) == pytest.approx(-float(adv.mean())) and float(same.approx_kl) == 0


def test_value_loss_clips_around_the_rollout_values() -> None:
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 0.0]])
    out = value_loss(new, old, returns, torch.ones(1, 2), clip_range_value=0.2)
    # token 0: unclipped error 0, clipped (0.2 - 1)^2 = 0.64 -> max 0.64; token 1: 0.01 both.
    assert float(out.loss) == pytest.approx(0.5 * (0.64 + 0.01) / 2)
    assert float(out.clip_frac) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- rollouts on a real model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, object]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_stages.tiny.assets import build_tiny_assets

    assets = build_tiny_assets(tmp_path_factory.mktemp("ppo-core"), seed=0)
    tok = AutoTokenizer.from_pretrained(str(assets.base_model))
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(str(assets.base_model))
    rm = AutoModelForSequenceClassification.from_pretrained(str(assets.base_model), num_labels=1)
    return tok, policy, rm


def test_generate_respects_budgets_and_logprobs_match_sampling(tiny: tuple[object, object, object]) -> None:
    tok, policy, _ = tiny
    prompts = [
        tok("Question: how is the old lake?\n\nAnswer:")["input_ids"],
        tok("Question: hi\n\nAnswer:")["input_ids"],
    ]
    eos = tok.eos_token_id
    torch.manual_seed(1)
    batch = generate(
        policy,
        prompts * 3,
        [1, 2, 3, 5, 8, 8],
        eos_ids=[eos],
        pad_id=tok.pad_token_id,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        extra={},
    )
    lengths = batch.lengths.long().tolist()
    for i, budget in enumerate([1, 2, 3, 5, 8, 8]):
        assert 1 <= lengths[i] <= budget
        real = batch.response[i, : lengths[i]].tolist()
        assert bool(batch.ended_with_eos[i]) == (real[-1] == eos) and eos not in real[:-1]
        assert bool(batch.ended_with_eos[i]) or lengths[i] == budget
        assert torch.all(batch.response[i, lengths[i] :] == tok.pad_token_id)

    # Log-probs from one padded forward equal those of each sequence alone (positions from the mask).
    logprobs, entropy = token_logprobs(policy, batch, temperature=0.7, with_entropy=True)
    for i in range(len(prompts) * 3):
        ids = torch.tensor([list(prompts[i % 2]) + batch.response[i, : lengths[i]].tolist()])
        logits = policy(input_ids=ids).logits[0, len(prompts[i % 2]) - 1 : -1] / 0.7
        alone = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompts[i % 2]) :, None]).squeeze(-1)
        assert torch.allclose(logprobs[i, : lengths[i]], alone, atol=1e-4)
        assert torch.all(logprobs[i, lengths[i] :] == 0) and torch.all(entropy[i, lengths[i] :] == 0)


def test_scores_are_read_at_the_generated_eos_as_the_reward_model_would(tiny: tuple[object, object, object]) -> None:
    from rlhf_stages.methods.ppo.models import TokenScorer

    tok, _, rm = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    q1, q2 = tok("Question: a\n\nAnswer:")["input_ids"], tok("Question: how is the old lake?\n\nAnswer:")["input_ids"]
    r1, r2 = tok(" the lake is nice.")["input_ids"] + [eos], tok(" no")["input_ids"]  # r2 cut off: no EOS
    width = max(len(q1), len(q2))
    query = torch.tensor([[pad] * (width - len(q1)) + q1, [pad] * (width - len(q2)) + q2])
    qmask = (torch.arange(width)[None] >= torch.tensor([[width - len(q1)], [width - len(q2)]])).long()
    rw = max(len(r1), len(r2))
    response = torch.tensor([r1 + [pad] * (rw - len(r1)), r2 + [pad] * (rw - len(r2))])
    rmask = torch.tensor([[1.0] * len(r1) + [0.0] * (rw - len(r1)), [1.0] * len(r2) + [0.0] * (rw - len(r2))])
    batch = Rollout(query, qmask, response, rmask, torch.tensor([True, False]))
    scorer = TokenScorer(rm)
    assert TokenScorer.supports(rm)
    with torch.no_grad():
        scores = last_token_scores(scorer, batch)
        alone = [rm(input_ids=torch.tensor([q + r])).logits[0, 0] for q, r in ((q1, r1), (q2, r2))]
        assert torch.allclose(scores, torch.stack(alone), atol=1e-4)
        values = token_values(scorer, batch)
        seq = torch.tensor([q2 + r2])
        per_position = rm.score(rm.model(input_ids=seq).last_hidden_state)[0, :, 0]
        assert torch.allclose(values[1, : len(r2)], per_position[len(q2) - 1 : -1], atol=1e-4)
        assert batch.select(torch.tensor([1])).response.shape == (1, rw)


# ----------------------------------------------------------------------------- checkpoints


def test_only_complete_checkpoints_are_resumed(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    gens = {"budgets": torch.Generator().manual_seed(3)}
    checkpoints = ckpt.checkpoint_dir(tmp_path)
    for step in (2, 4, 6):
        tmp = checkpoints.staging(step)
        tmp.mkdir(parents=True)
        ckpt.write_shared(tmp, model, optimizer, step, {"kl_controller": {"value": step}})
        ckpt.write_rank(tmp, 0, gens)
        checkpoints.publish(step)
    assert [s for s, _ in checkpoints.complete()] == [4, 6]  # older pruned
    (tmp_path / "checkpoint-8").mkdir()  # a crash before state.json: incomplete
    checkpoints.staging(10).mkdir()  # a kill mid-save: never published
    assert checkpoints.latest() == (6, tmp_path / "checkpoint-6")
    checkpoints.clear_incoming()
    assert not checkpoints.staging(10).exists()

    expected = gens["budgets"].get_state().clone()
    fresh = torch.nn.Linear(2, 1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    other = {"budgets": torch.Generator().manual_seed(99)}
    extra = ckpt.load(tmp_path / "checkpoint-6", 0, fresh, fresh_opt, other)
    assert extra["step"] == 6 and extra["kl_controller"] == {"value": 6}
    assert torch.equal(fresh.weight, model.weight) and torch.equal(other["budgets"].get_state(), expected)
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert json.loads((tmp_path / "checkpoint-6" / ckpt.STATE_FILE).read_text())["complete"] is True
