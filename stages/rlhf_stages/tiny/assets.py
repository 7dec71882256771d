"""Tiny, fully local assets for running the RLHF pipeline end to end on CPU.

Nothing here touches the network: the tokenizer is trained on a synthetic
corpus, the model is randomly initialised and the datasets are generated from
a small grammar.  Everything is deterministic for a given ``seed``.

Usage::

    python -m rlhf_stages.tiny --out DIR [--seed N] [--judge]

Layout written under ``DIR``::

    tokenizer/            PreTrainedTokenizerFast (byte-level BPE, ~550 tokens)
    base-model/           tiny LlamaForCausalLM (+ the tokenizer files)
    data/sft.jsonl                 system_prompt, question, response (+ id, topic, target)
    data/sft_eval.jsonl            same columns, unseen topics only
    data/preferences.jsonl         prompt, chosen, rejected (+ question, topic, kind)
    data/preferences_eval.jsonl    same columns, unseen topics only
    data/hh_rlhf.jsonl             chosen, rejected as hh-rlhf transcripts
    data/hh_rlhf_eval.jsonl        same, unseen topics only
    data/prompts.jsonl             prompt (+ question, topic): RL training prompts
    data/eval_prompts.jsonl        prompt (+ question, topic): unseen topics
    data/eval_prompts_seen.jsonl   prompt (+ question, topic): training topics

The task
--------
Every prompt asks about one *topic*, a modifier and a place ("how is the
old lake?").  A response meets the **target behaviour** when it is a complete
sentence (ends with ".", "!" or "?") that mentions the asked topic (both
words), uses more positive than negative words (see ``POSITIVE_WORDS`` /
``NEGATIVE_WORDS``), has 3-24 words and repeats no word more than twice (nor
twice in a row).  Answers in the data have 7-11 words.  SFT data
is a 50/50 mix of positive and negative answers, so an SFT policy hits the
target only about half of the time and RL has something to improve.
``rlhf_stages.tiny.ground_truth.meets_target`` is the programmatic check.

Topics in ``HELD_OUT_TOPICS`` (unseen modifier/place combinations) never
occur in a training file; they only occur in the ``*_eval`` files and
``eval_prompts.jsonl``.

Prompt template
---------------
``DEFAULT_PROMPT_TEMPLATE = "Question: {question}\\n\\nAnswer: {response}"``.
The *prompt* is the template text before ``{response}`` with trailing spaces
removed, i.e. ``"Question: how is the old lake?\\n\\nAnswer:"`` -- it ends with
the colon, with NO trailing space.  The *completion* carries the separator:
``" the old lake is lovely and calm."`` (one leading space).  ``prompt +
completion`` is exactly the rendered template.  Byte-level BPE encodes the
leading space into the first completion token ("Ġthe"), so tokenising the
prompt and the completion separately or together gives the same ids.

``prompt``/``chosen``/``rejected`` in the preference files follow the same
rule (``chosen`` and ``rejected`` start with a space, except the empty
answer which is ``""``).  The hh-rlhf files use ``"\\n\\nHuman: {question}"
"\\n\\nAssistant: {response}"`` with the same convention after
``"Assistant:"``.

Tokenizer
---------
Special tokens ``<s>`` (bos), ``</s>`` (eos), ``<pad>`` (pad), ``<unk>``
(unk), all distinct.  No special token is added automatically when encoding
(like GPT-2): trainers append ``</s>`` themselves.  The chat template renders
a system message as ``"{content}\\n\\n"``, a user message as
``"Question: {content}\\n\\nAnswer:"`` and an assistant message as
``" {content}</s>"``, so a single-turn chat equals the plain template.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PROMPT_TEMPLATE = "Question: {question}\n\nAnswer: {response}"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

TOKENIZER_VOCAB_SIZE = 600

# A topic is "<modifier> <place>" ("old lake").  Held-out topics are unseen
# *combinations* of words that training does use: a single unseen topic word
# would be an untrained token that a tiny model cannot produce, whereas an
# unseen combination tests whether the policy copies the asked topic instead
# of memorising topic -> answer.  Fixed (not seed dependent) so that every
# build, and every engineer, agrees on which topics are unseen.
MODIFIERS: tuple[str, ...] = ("old", "new", "big", "small", "north", "south", "east", "west")
PLACES: tuple[str, ...] = (
    "lake",
    "park",
    "garden",
    "river",
    "forest",
    "beach",
    "village",
    "bridge",
    "market",
    "library",
    "school",
    "museum",
    "station",
    "hotel",
    "harbor",
    "castle",
)
# One combination per modifier, each with a different place, so every word
# of a held-out topic still occurs (with other partners) in training.
HELD_OUT_TOPICS: tuple[str, ...] = tuple(f"{m} {PLACES[2 * i + 1]}" for i, m in enumerate(MODIFIERS))
ALL_TOPICS: tuple[str, ...] = tuple(f"{m} {p}" for m in MODIFIERS for p in PLACES)
TRAIN_TOPICS: tuple[str, ...] = tuple(t for t in ALL_TOPICS if t not in HELD_OUT_TOPICS)

POSITIVE_WORDS: tuple[str, ...] = (
    "lovely",
    "calm",
    "bright",
    "clean",
    "pleasant",
    "warm",
    "beautiful",
    "quiet",
    "nice",
    "wonderful",
    "good",
    "great",
    "sunny",
    "fresh",
    "friendly",
    "peaceful",
)
NEGATIVE_WORDS: tuple[str, ...] = (
    "awful",
    "cold",
    "dirty",
    "dark",
    "noisy",
    "ugly",
    "gloomy",
    "bad",
    "terrible",
    "dull",
    "broken",
    "sad",
    "grim",
    "smelly",
    "crowded",
    "horrible",
)
# Subjects for "no topic" hard negatives: fluent, positive, but not about
# anything that was asked.
FILLER_SUBJECTS: tuple[str, ...] = ("weather", "music", "food", "movie", "game", "song")

QUESTION_TEMPLATES: tuple[str, ...] = (
    "how is the {topic}?",
    "what do you think of the {topic}?",
    "tell me about the {topic}.",
    "describe the {topic} for me.",
    "what is the {topic} like?",
    "how does the {topic} look today?",
    "can you say something about the {topic}?",
    "give me your opinion of the {topic}.",
)
# Answers are 6-12 words; {a}, {b}, {c} are filled with sentiment words of one
# polarity.  Every template mentions the topic once and ends with a period.
RESPONSE_TEMPLATES: tuple[str, ...] = (
    "the {topic} is {a} and {b}.",
    "the {topic} is very {a} today.",
    "i think the {topic} is {a} and {b}.",
    "the {topic} looks {a} and feels {b} this morning.",
    "people say the {topic} is really {a}.",
    "today the {topic} was {a}, {b} and {c}.",
    "in my view the {topic} is quite {a} and {b}.",
    "the {topic} seems {a} in the evening.",
)
MIXED_TEMPLATE = "the {topic} is {a} but {b} and {c}."  # 1 positive < 2 negative

# How often each kind of rejected answer appears in preference pairs.  Plain
# negative answers dominate; the rest are hard negatives that stop a reward
# model from rewarding surface features (length, a positive word, repetition).
REJECTED_KIND_WEIGHTS: dict[str, float] = {
    "negative": 0.18,
    # The sentiment words deleted: PPO found a reward model that had learned "no negative word"
    # instead of "a positive word" ("the west castle is very this morning." scored above correct).
    "neutral": 0.10,
    "mixed": 0.08,
    "truncated": 0.10,
    "empty": 0.06,
    "off_topic": 0.12,
    "no_topic": 0.08,
    "repetitive": 0.12,
    # Broken text built from the chosen answer's own words: PPO found that a reward model which
    # never saw such text scored "people say the my view the the evening." above a correct answer.
    "stutter": 0.06,
    "salad": 0.10,
}
REJECTED_KINDS: tuple[str, ...] = tuple(REJECTED_KIND_WEIGHTS)

N_SFT = 2000
N_SFT_EVAL = 200
N_PREFERENCES = 2000
N_PREFERENCES_EVAL = 300


@dataclass(frozen=True)
class TinyAssets:
    """Paths of a built asset directory."""

    root: Path
    tokenizer: Path
    base_model: Path
    data_dir: Path
    sft: Path
    sft_eval: Path
    preferences: Path
    preferences_eval: Path
    hh_rlhf: Path
    hh_rlhf_eval: Path
    prompts: Path
    eval_prompts: Path
    eval_prompts_seen: Path

    @classmethod
    def at(cls, out_dir: Path) -> TinyAssets:
        """The layout under ``out_dir`` (does not check that files exist)."""
        root = Path(out_dir)
        data = root / "data"
        return cls(
            root=root,
            tokenizer=root / "tokenizer",
            base_model=root / "base-model",
            data_dir=data,
            sft=data / "sft.jsonl",
            sft_eval=data / "sft_eval.jsonl",
            preferences=data / "preferences.jsonl",
            preferences_eval=data / "preferences_eval.jsonl",
            hh_rlhf=data / "hh_rlhf.jsonl",
            hh_rlhf_eval=data / "hh_rlhf_eval.jsonl",
            prompts=data / "prompts.jsonl",
            eval_prompts=data / "eval_prompts.jsonl",
            eval_prompts_seen=data / "eval_prompts_seen.jsonl",
        )


# --------------------------------------------------------------------------
# Prompt template helpers (shared with the rest of the project)
# --------------------------------------------------------------------------


def split_prompt_template(template: str = DEFAULT_PROMPT_TEMPLATE) -> tuple[str, str]:
    """Split ``template`` into (prompt part, completion prefix).

    The prompt part is everything before ``{response}`` minus trailing spaces;
    those spaces become the completion prefix.  Newlines are kept in the
    prompt, so a template ending in ``"\\n{response}"`` has an empty prefix.
    """
    marker = "{response}"
    if template.count(marker) != 1 or "{question}" not in template:
        raise ValueError("prompt template needs exactly one {response} and a {question}")
    head, tail = template.split(marker)
    if tail.strip():
        # A suffix after the response would be part of the completion and make
        # "the completion ends with EOS" ambiguous; nothing in the project needs it.
        raise ValueError("{response} must be at the end of the prompt template")
    prompt_part = head.rstrip(" ")
    return prompt_part, head[len(prompt_part) :]


def format_prompt(question: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """``"Question: {question}\\n\\nAnswer:"`` for the default template."""
    prompt_part, _ = split_prompt_template(template)
    return prompt_part.replace("{question}", question)


def format_completion(response: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """The response with the template's separator (one space by default).

    An empty response stays empty so that "empty answer" means no tokens.
    """
    _, prefix = split_prompt_template(template)
    return prefix + response if response else ""


def hh_transcript(question: str, response: str) -> str:
    """One-turn hh-rlhf transcript: ``"\\n\\nHuman: q\\n\\nAssistant: r"``."""
    answer = f" {response}" if response else ""
    return f"{HH_HUMAN} {question}{HH_ASSISTANT}{answer}"


# --------------------------------------------------------------------------
# Synthetic text generation
# --------------------------------------------------------------------------


def _pick_words(rng: random.Random, pool: Sequence[str], n: int) -> list[str]:
    return rng.sample(list(pool), n)


def make_question(rng: random.Random, topic: str) -> str:
    return rng.choice(QUESTION_TEMPLATES).format(topic=topic)


def make_response(rng: random.Random, topic: str, positive: bool) -> str:
    """A fluent, on-topic answer of one polarity."""
    a, b, c = _pick_words(rng, POSITIVE_WORDS if positive else NEGATIVE_WORDS, 3)
    return rng.choice(RESPONSE_TEMPLATES).format(topic=topic, a=a, b=b, c=c)


def make_rejected(rng: random.Random, topic: str, kind: str, topics: Sequence[str]) -> str:
    """A response that fails the target in the way named by ``kind``."""
    if kind == "negative":
        return make_response(rng, topic, positive=False)
    if kind == "mixed":
        # Contains a positive word, so a reward model keyed on "any positive
        # word" is wrong here.
        a = rng.choice(POSITIVE_WORDS)
        b, c = _pick_words(rng, NEGATIVE_WORDS, 2)
        return MIXED_TEMPLATE.format(topic=topic, a=a, b=b, c=c)
    if kind == "truncated":
        # A positive answer cut mid-sentence: no final period.
        words = make_response(rng, topic, positive=True).split()
        return " ".join(words[: rng.randint(1, len(words) - 1)]).rstrip(",.")
    if kind == "empty":
        return ""
    if kind == "off_topic":
        # Positive and fluent, but about another topic of the same split;
        # usually one sharing a word with the asked one ("new lake" for "old
        # lake"), so that matching a single word is not enough.
        modifier, place = topic.split()
        near = [t for t in topics if t != topic and (t.startswith(modifier + " ") or t.endswith(" " + place))]
        far = [t for t in topics if t != topic]
        other = rng.choice(near if near and rng.random() < 0.7 else far)
        return make_response(rng, other, positive=True)
    if kind == "no_topic":
        subject = rng.choice(FILLER_SUBJECTS)
        a, b = _pick_words(rng, POSITIVE_WORDS, 2)
        return f"the {subject} is {a} and {b}."
    if kind == "repetitive":
        style = rng.randrange(3)
        if style == 0:  # one positive word over and over
            return " ".join([rng.choice(POSITIVE_WORDS)] * rng.randint(4, 12))
        if style == 1:  # a positive sentence looping
            sentence = f"the {topic} is {rng.choice(POSITIVE_WORDS)}."
            return " ".join([sentence] * rng.randint(3, 4))
        words = _pick_words(rng, POSITIVE_WORDS, 2)  # alternating pair
        return " ".join(words * rng.randint(3, 5)) + "."
    if kind == "neutral":
        words = make_response(rng, topic, positive=True).rstrip(".").replace(",", "").split()
        kept = [w for w in words if w not in POSITIVE_WORDS]
        return " ".join(kept) + "."
    if kind == "stutter":
        # A correct answer with one word said twice in a row.
        words = make_response(rng, topic, positive=True).rstrip(".").split()
        at = rng.randrange(len(words))
        return " ".join([*words[: at + 1], words[at], *words[at + 1 :]]) + "."
    if kind == "salad":
        # The positive answer's words shuffled with the topic's two words split apart (so the
        # topic is never named), sometimes with a stutter: fluent-looking tokens, no sentence.
        modifier, place = topic.split()
        words = [w for w in make_response(rng, topic, positive=True).rstrip(".").split() if w not in (modifier, place)]
        words += [rng.choice(FILLER_SUBJECTS)]
        rng.shuffle(words)
        words.insert(rng.randrange(len(words) + 1), place)
        words.insert(0, modifier) if words[0] != place else words.append(modifier)
        if rng.random() < 0.5:
            at = rng.randrange(len(words))
            words.insert(at, words[at])
        return " ".join(words) + "."
    raise ValueError(f"unknown rejected kind {kind!r}")


def _sft_rows(rng: random.Random, topics: Sequence[str], n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i in range(n):
        topic = rng.choice(topics)
        positive = i % 2 == 0  # exact 50/50 mix, order shuffled below
        rows.append(
            {
                "id": f"tiny.{i}",
                "system_prompt": DEFAULT_SYSTEM_PROMPT,
                "question": make_question(rng, topic),
                "response": make_response(rng, topic, positive),
                "topic": topic,
                "target": positive,
            }
        )
    rng.shuffle(rows)
    return rows


def _preference_rows(rng: random.Random, topics: Sequence[str], n: int, template: str) -> list[dict[str, Any]]:
    kinds = list(REJECTED_KIND_WEIGHTS)
    weights = [REJECTED_KIND_WEIGHTS[k] for k in kinds]
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        topic = rng.choice(topics)
        question = make_question(rng, topic)
        kind = rng.choices(kinds, weights)[0]
        rows.append(
            {
                "prompt": format_prompt(question, template),
                "chosen": format_completion(make_response(rng, topic, True), template),
                "rejected": format_completion(make_rejected(rng, topic, kind, topics), template),
                "question": question,
                "topic": topic,
                "kind": kind,
            }
        )
    return rows


def _hh_rows(preference_rows: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    return [
        {
            "chosen": hh_transcript(r["question"], r["chosen"].strip()),
            "rejected": hh_transcript(r["question"], r["rejected"].strip()),
        }
        for r in preference_rows
    ]


def _prompt_rows(rng: random.Random, topics: Sequence[str], template: str) -> list[dict[str, str]]:
    # Every (topic, question form) once: RL trainers cycle over them anyway.
    rows = [
        {"prompt": format_prompt(q.format(topic=t), template), "question": q.format(topic=t), "topic": t}
        for t in topics
        for q in QUESTION_TEMPLATES
    ]
    rng.shuffle(rows)
    return rows


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}Question: {{ message['content'] }}\n\nAnswer:"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% if not loop.last %}\n\n{% endif %}"
    "{% endif %}"
    "{% endfor %}"
)


def _tokenizer_corpus() -> list[str]:
    """Text the BPE merges are learned from.

    Built from the grammar rather than the sampled files so it is independent
    of the seed and covers every word (held-out topics included, as a
    pretrained tokenizer would know them; this is no training signal for the
    model).
    """
    lines: list[str] = []
    sentiment = POSITIVE_WORDS + NEGATIVE_WORDS
    for i, topic in enumerate(ALL_TOPICS):
        for q in QUESTION_TEMPLATES:
            lines.append(format_prompt(q.format(topic=topic)))
        for j, r in enumerate(RESPONSE_TEMPLATES):
            a, b, c = (sentiment[(i + j + k * 7) % len(sentiment)] for k in range(3))
            lines.append(" " + r.format(topic=topic, a=a, b=b, c=c))
    lines += [f" the {s} is nice." for s in FILLER_SUBJECTS]
    # Sentiment words are what RL changes: make each of them frequent enough
    # to become a single token, so choosing one is a single decision.
    lines += [f" the {topic} is {w}." for topic in ALL_TOPICS for w in sentiment]
    lines += [DEFAULT_SYSTEM_PROMPT, HH_HUMAN, HH_ASSISTANT]
    return lines


def build_tokenizer(out_dir: Path) -> Any:
    """Train a byte-level BPE tokenizer and save it as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN]
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=specials,
        # All 256 bytes, so any text (e.g. sampled garbage) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_llama(tokenizer: Any, seed: int, *, hidden: int = 64, layers: int = 2, max_positions: int = 256) -> Any:
    """A randomly initialised tiny Llama over ``tokenizer`` (the base model; the RLAIF judge is a larger one)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Tied embeddings: fewer parameters, and copying a topic word from the
        # prompt (needed for unseen topics) is easier when input and output
        # embeddings are shared.
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def build_base_model(tokenizer: Any, out_dir: Path, seed: int) -> None:
    """Randomly initialised tiny Llama, saved with the tokenizer."""
    tiny_llama(tokenizer, seed).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def build_tiny_data(out_dir: Path, seed: int = 0, template: str = DEFAULT_PROMPT_TEMPLATE) -> TinyAssets:
    """Write only the jsonl files (no torch/transformers needed)."""
    assets = TinyAssets.at(out_dir)

    # One independent stream per file, so changing one file's size does not
    # reshuffle the others.
    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}:{name}")

    train, held = TRAIN_TOPICS, HELD_OUT_TOPICS
    _write_jsonl(assets.sft, _sft_rows(rng("sft"), train, N_SFT))
    _write_jsonl(assets.sft_eval, _sft_rows(rng("sft_eval"), held, N_SFT_EVAL))
    prefs = _preference_rows(rng("prefs"), train, N_PREFERENCES, template)
    prefs_eval = _preference_rows(rng("prefs_eval"), held, N_PREFERENCES_EVAL, template)
    _write_jsonl(assets.preferences, prefs)
    _write_jsonl(assets.preferences_eval, prefs_eval)
    _write_jsonl(assets.hh_rlhf, _hh_rows(prefs))
    _write_jsonl(assets.hh_rlhf_eval, _hh_rows(prefs_eval))
    _write_jsonl(assets.prompts, _prompt_rows(rng("prompts"), train, template))
    _write_jsonl(assets.eval_prompts, _prompt_rows(rng("eval_prompts"), held, template))
    # Same size as eval_prompts, for comparing seen and unseen topics.
    seen = _prompt_rows(rng("eval_prompts_seen"), train, template)[: len(held) * len(QUESTION_TEMPLATES)]
    _write_jsonl(assets.eval_prompts_seen, seen)
    return assets


def build_tiny_assets(out_dir: Path, seed: int = 0) -> TinyAssets:
    """Build tokenizer, base model and datasets under ``out_dir``."""
    assets = build_tiny_data(out_dir, seed)
    tokenizer = build_tokenizer(assets.tokenizer)
    build_base_model(tokenizer, assets.base_model, seed)
    return assets
