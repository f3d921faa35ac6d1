"""LLaVA-Instruct / mix665k records -> native LLaVA training rows in upstream's ``v1`` (Vicuna) template.

Record format (``llava_v1_5_mix665k.json``)::

    {"id": "...", "image": "coco/train2017/x.jpg",            # optional: text-only records have none
     "conversations": [{"from": "human", "value": "<image>\\nQuestion?"}, {"from": "gpt", "value": "Answer."},
                       {"from": "human", "value": "Follow-up?"},         {"from": "gpt", "value": "Answer 2."}]}

Prompt (``v1``: system prompt, ``sep=" "`` after user turns, ``sep2=</s>`` after assistant turns)::

    {SYSTEM} USER: <image>\\nQuestion? ASSISTANT: Answer.</s>USER: Follow-up? ASSISTANT: Answer 2.</s>

The placeholder is moved to the front of its turn as ``<image>\\n`` (as upstream does) and expands to
``image_seq_length`` image tokens. Labels are ``-100`` everywhere except the assistant answers: for
every assistant turn, the tokens from the space after ``ASSISTANT:`` through the closing ``</s>``
(the tokens the model generates after a ``... ASSISTANT:`` prompt). Upstream's ``preprocess_v1``
finds the same spans by re-tokenising each round and subtracting fixed offsets; here the whole
prompt is tokenised once and the spans come from the tokenizer's character offsets, so there is no
"tokenization mismatch" case.

``--version chat_template`` renders the same turns with the LLM tokenizer's own chat template
(e.g. Qwen2's ChatML: ``<|im_start|>user\n<image>\nQuestion?<|im_end|>\n<|im_start|>assistant\n
Answer.<|im_end|>\n``); the labels keep each assistant turn from the end of the generation prompt
before it through its closing marker (found by rendering the conversation turn by turn).

Truncation to ``model_max_length`` cuts from the end, like upstream. A record whose image tokens would
be cut, or that keeps no answer token after the cut, is dropped when the dataset is built (counted
and logged with its id); ``strict=True`` raises instead, naming the record.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from llava_contrastive.hosts.hf.data import IGNORE_INDEX, Collator

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
USER, ASSISTANT = "USER", "ASSISTANT"
_ROLES = {"human": USER, "gpt": ASSISTANT}

logger = logging.getLogger("llava_contrastive")


class RecordError(ValueError):
    """A record that cannot become a training row; the message names the record."""


def record_id(record, index: Optional[int] = None) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"id={rid!r}" if rid is not None else f"index {index}"


def turns_of(record, index: Optional[int] = None) -> List[Tuple[str, str]]:
    """[(USER|ASSISTANT, text)] with the image placeholder placed as upstream's
    ``preprocess_multimodal`` places it (``<image>\\n`` + rest of the turn, stripped)."""
    name = record_id(record, index)
    convs = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(convs, list) or not convs:
        raise RecordError(f"record {name}: no 'conversations' list")
    if convs[0].get("from") != "human":  # upstream skips a leading non-human turn
        convs = convs[1:]
    turns = []
    for j, c in enumerate(convs):
        role = _ROLES.get(c.get("from")) if isinstance(c, dict) else None
        if role is None or not isinstance(c.get("value"), str):
            raise RecordError(f"record {name}: turn {j} has from={c.get('from') if isinstance(c, dict) else c!r}; "
                              f"expected 'human' or 'gpt' with a string 'value'")
        if role != (USER, ASSISTANT)[j % 2]:
            raise RecordError(f"record {name}: turns must alternate human/gpt, turn {j} is {c.get('from')!r}")
        turns.append((role, c["value"]))
    if not any(role == ASSISTANT for role, _ in turns):
        raise RecordError(f"record {name}: no gpt turn (nothing to train on)")
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if "image" in record:
        if n_placeholders > 1:
            raise RecordError(f"record {name}: {n_placeholders} '<image>' placeholders; one image per record is supported")
        if n_placeholders == 0:  # an image without a placeholder: it goes in front of the first question
            turns[0] = (USER, IMAGE_PLACEHOLDER + "\n" + turns[0][1])
        for j, (role, text) in enumerate(turns):
            if IMAGE_PLACEHOLDER in text:
                if role != USER:
                    raise RecordError(f"record {name}: '<image>' is in a gpt turn")
                turns[j] = (role, (IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip())
    elif n_placeholders:
        raise RecordError(f"record {name}: '<image>' placeholder but no 'image' field")
    return turns


def build_prompt(turns: Sequence[Tuple[str, str]], eos: str = "</s>", system: str = SYSTEM_V1
                 ) -> Tuple[str, List[Tuple[int, int]]]:
    """The ``v1`` prompt and the character spans the labels keep: for each assistant turn, from the
    space after ``ASSISTANT:`` to the end of its ``</s>``."""
    text = system + " "
    spans = []
    for role, message in turns:
        text += role + ":"
        if role == ASSISTANT:
            start = len(text)
            text += " " + message + eos
            spans.append((start, len(text)))
        else:
            text += " " + message + " "
    return text, spans


def user_text(question: str, has_image: bool = True) -> str:
    """A question as its user turn: ``<image>\\n`` first when it has an image (as upstream places it)."""
    return (IMAGE_PLACEHOLDER + "\n" + question) if has_image else question


def generation_prompt(question: str, has_image: bool = True, system: str = SYSTEM_V1) -> str:
    """``{SYSTEM} USER: <image>\\nquestion ASSISTANT:`` -- what a trained model is prompted with."""
    return f"{system} {USER}: {user_text(question, has_image)} {ASSISTANT}:"


PROMPT_FORMATS = ("v1", "chat_template")


def chat_messages(turns: Sequence[Tuple[str, str]]) -> List[Dict[str, str]]:
    return [{"role": "user" if role == USER else "assistant", "content": text} for role, text in turns]


def _render(tokenizer, messages, generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def build_chat_prompt(tokenizer, turns: Sequence[Tuple[str, str]]) -> Tuple[str, List[Tuple[int, int]]]:
    """The conversation in the tokenizer's chat template and the character spans the labels keep:
    each assistant turn from the end of the generation prompt before it to its end (trailing
    whitespace excluded), found by rendering the conversation turn by turn."""
    messages = chat_messages(turns)
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, upto = _render(tokenizer, messages[:i], generation=True), _render(tokenizer, messages[:i + 1])
        if not (text.startswith(upto) and upto.startswith(before)):
            raise ValueError("the tokenizer's chat template does not render a conversation as the concatenation of "
                             "its turns (the answer spans cannot be found). Fix: use --version v1.")
        spans.append((len(before), len(upto.rstrip())))
    return text, spans


def chat_generation_prompt(tokenizer, question: str, has_image: bool = True) -> str:
    """One user turn in the tokenizer's chat template, with its generation prompt."""
    return _render(tokenizer, [{"role": "user", "content": user_text(question, has_image)}], generation=True)


def chat_turn_end_ids(tokenizer) -> List[int]:
    """The token that closes an assistant turn in the tokenizer's chat template (ChatML: <|im_end|>),
    as a generation stop id; [] when the template closes turns with plain text or not at all."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    before, full = _render(tokenizer, messages[:1], generation=True), _render(tokenizer, messages)
    if not full.startswith(before + "y"):
        return []
    ids = tokenizer(full[len(before) + 1:].strip(), add_special_tokens=False).input_ids
    return ids[:1] if ids and ids[0] in tokenizer.all_special_ids else []


@dataclass
class Encoded:
    input_ids: List[int]      # with the image placeholder still one token
    labels: List[int]
    image_index: int          # position of the placeholder, -1 for text-only


def _label_positions_from_offsets(offsets, spans) -> List[bool]:
    """True for tokens whose character range overlaps a span (offsets and spans both ascending)."""
    keep = []
    k = 0
    for s, e in offsets:
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        keep.append(e > s and k < len(spans) and s < spans[k][1] and e > spans[k][0])
    return keep


class V1Tokenizer:
    """Tokenises ``v1`` prompts with the native processor's tokenizer and labels the answer spans."""

    add_special_tokens = True  # the tokenizer's BOS before the system prompt, as upstream

    def __init__(self, tokenizer, image_token_id: int):
        self.tok = tokenizer
        self.image_token_id = int(image_token_id)
        self.eos = tokenizer.eos_token
        if self.eos is None:
            raise ValueError("the tokenizer has no eos token (v1 closes every answer with it)")
        self.use_offsets = bool(getattr(tokenizer, "is_fast", False))

    def encode_text(self, text: str, spans) -> Encoded:
        special = self.add_special_tokens
        if self.use_offsets:
            enc = self.tok(text, add_special_tokens=special, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            keep = _label_positions_from_offsets(enc["offset_mapping"], spans)
        else:  # slow tokenizer: span boundaries by tokenising prefixes (as upstream's preprocess_v1 does)
            ids = list(self.tok(text, add_special_tokens=special).input_ids)
            keep = [False] * len(ids)
            for a, b in spans:
                lo = len(self.tok(text[:a], add_special_tokens=special).input_ids)
                hi = len(self.tok(text[:b], add_special_tokens=special).input_ids)
                for k in range(lo, min(hi, len(ids))):
                    keep[k] = True
        labels = [t if k and t != self.image_token_id else IGNORE_INDEX for t, k in zip(ids, keep)]
        image_index = ids.index(self.image_token_id) if self.image_token_id in ids else -1
        return Encoded(ids, labels, image_index)

    def prompt(self, turns) -> Tuple[str, List[Tuple[int, int]]]:
        return build_prompt(turns, eos=self.eos)

    def encode(self, record, index: Optional[int] = None) -> Encoded:
        turns = turns_of(record, index)
        text, spans = self.prompt(turns)
        enc = self.encode_text(text, spans)
        n_img = enc.input_ids.count(self.image_token_id)
        want = 1 if "image" in record else 0
        if n_img != want:
            raise RecordError(f"record {record_id(record, index)}: tokenised prompt has {n_img} image tokens, "
                              f"expected {want}")
        return enc


class ChatTemplateTokenizer(V1Tokenizer):
    """The same rows in the tokenizer's own chat template (its special tokens come from the template)."""

    add_special_tokens = False

    def __init__(self, tokenizer, image_token_id: int):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--version chat_template: the tokenizer ({type(tokenizer).__name__}) has no chat "
                             f"template. Fix: use --version v1 (upstream's Vicuna template).")
        super().__init__(tokenizer, image_token_id)

    def prompt(self, turns) -> Tuple[str, List[Tuple[int, int]]]:
        return build_chat_prompt(self.tok, turns)


def prompt_tokenizer(prompt_format: str, tokenizer, image_token_id: int) -> V1Tokenizer:
    if prompt_format in ("v1", "vicuna_v1"):
        return V1Tokenizer(tokenizer, image_token_id)
    if prompt_format == "chat_template":
        return ChatTemplateTokenizer(tokenizer, image_token_id)
    raise ValueError(f"--version {prompt_format!r}: choose one of {', '.join(PROMPT_FORMATS)}")


def expand_and_truncate(enc: Encoded, image_seq_length: int, max_length: int, image_token_id: int,
                        name: str = "") -> Tuple[List[int], List[int]]:
    """Placeholder -> ``image_seq_length`` image tokens (label -100), then cut to ``max_length``.
    Raises RecordError if the cut would go through the image tokens or leave no answer token."""
    ids, labels = enc.input_ids, enc.labels
    if enc.image_index >= 0:
        i = enc.image_index
        ids = ids[:i] + [image_token_id] * image_seq_length + ids[i + 1:]
        labels = labels[:i] + [IGNORE_INDEX] * image_seq_length + labels[i + 1:]
        image_end = i + image_seq_length
        if image_end > max_length:
            raise RecordError(f"record {name}: model_max_length {max_length} would cut through its image tokens "
                              f"(positions {i}..{image_end - 1} of {len(ids)})")
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        raise RecordError(f"record {name}: no answer token left within model_max_length {max_length} "
                          f"(prompt length {len(enc.input_ids)})")
    return ids, labels


def expand2square(image: Image.Image, background) -> Image.Image:
    """Pad to a square with ``background`` (upstream's ``--image_aspect_ratio pad``), image centred."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def load_pixel_values(path: str, image_processor, image_aspect_ratio: str = "square") -> torch.Tensor:
    """[3, H, W] pixels of one image file; ``pad`` squares it with the processor's mean colour first."""
    image = Image.open(path).convert("RGB")
    if image_aspect_ratio == "pad":
        image = expand2square(image, tuple(int(x * 255) for x in image_processor.image_mean))
    return image_processor(image, return_tensors="pt")["pixel_values"][0]


class InstructDataset(Dataset):
    """mix665k-format records -> {input_ids, labels, pixel_values?} rows for the native model.

    Building the dataset checks every record (malformed turns, placeholder without image, ...) and
    tokenises its prompt once, batched, to find those that cannot fit ``max_length``: they are
    dropped and counted (``self.dropped``: list of (index, reason)), or, with ``strict=True``, the
    first raises RecordError naming it. Rows are tokenised again, lazily, in ``__getitem__``."""

    def __init__(self, records_or_path, image_folder, processor, image_seq_length: int, max_length: int = 2048,
                 image_aspect_ratio: str = "square", strict: bool = False, name: str = "data",
                 prompt_format: str = "v1"):
        if isinstance(records_or_path, (str, os.PathLike)):
            with open(records_or_path) as f:
                records = json.load(f)
        else:
            records = list(records_or_path)
        if image_aspect_ratio not in ("square", "pad"):
            raise ValueError(f"image_aspect_ratio must be 'square' or 'pad', got {image_aspect_ratio!r}")
        self.image_folder = str(image_folder) if image_folder is not None else None
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", IMAGE_PLACEHOLDER))
        self.image_seq_length = int(image_seq_length)
        self.max_length = int(max_length)
        self.image_aspect_ratio = image_aspect_ratio
        self.v1 = prompt_tokenizer(prompt_format, self.tokenizer, self.image_token_id)
        self.dropped: List[Tuple[int, str]] = []
        self.records = []
        self.indices: List[int] = []  # position of each kept record in the input list
        for start in range(0, len(records), 1024):
            chunk = records[start:start + 1024]
            prompts = []
            for i, r in enumerate(chunk, start):
                try:
                    prompts.append((i, r, self.v1.prompt(turns_of(r, i))[0]))
                except RecordError as e:
                    if strict:
                        raise
                    self.dropped.append((i, str(e)))
            batch_ids = self.tokenizer([p for _, _, p in prompts], add_special_tokens=self.v1.add_special_tokens
                                       )["input_ids"] \
                if prompts else []
            for (i, r, _), ids in zip(prompts, batch_ids):
                n = len(ids) + ((self.image_seq_length - 1) if "image" in r else 0)
                try:
                    if ids.count(self.image_token_id) != int("image" in r):
                        raise RecordError(f"record {record_id(r, i)}: tokenised prompt has "
                                          f"{ids.count(self.image_token_id)} image tokens, expected {int('image' in r)}")
                    if n > self.max_length or not self.v1.use_offsets:
                        self._check(r, i)  # full encoding only where the cut matters
                except RecordError as e:
                    if strict:
                        raise
                    self.dropped.append((i, str(e)))
                    continue
                self.records.append(r)
                self.indices.append(i)
        self.dropped.sort()
        self.n_text_only = sum("image" not in r for r in self.records)
        msg = (f"[stage2] {name}: {len(self.records)} records ({self.n_text_only} text-only), "
               f"dropped {len(self.dropped)}")
        if self.dropped:
            msg += "; first: " + " | ".join(reason for _, reason in self.dropped[:3])
        if self.dropped:
            logger.warning(msg)
        else:
            logger.info(msg)
        if not self.records:
            raise ValueError(f"{name}: no usable record ({len(self.dropped)} dropped): "
                             + (self.dropped[0][1] if self.dropped else "empty file"))

    def _check(self, record, index):
        enc = self.v1.encode(record, index)
        expand_and_truncate(enc, self.image_seq_length, self.max_length, self.image_token_id,
                            record_id(record, index))

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, i) -> Tuple[List[int], List[int]]:
        record, index = self.records[i], self.indices[i]
        enc = self.v1.encode(record, index)
        return expand_and_truncate(enc, self.image_seq_length, self.max_length, self.image_token_id,
                                   record_id(record, index))

    def load_image(self, record) -> torch.Tensor:
        return load_pixel_values(os.path.join(self.image_folder, record["image"]), self.processor.image_processor,
                                 self.image_aspect_ratio)

    def __getitem__(self, i) -> Dict[str, torch.Tensor]:
        ids, labels = self.encode(i)
        item = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
        record = self.records[i]
        if "image" in record:
            item["pixel_values"] = self.load_image(record)
        return item


InstructCollator = Collator  # the stage-1 collator handles rows without an image


def split_records(records: list, eval_size: float, seed: int) -> Tuple[list, list]:
    """(train, eval): ``eval_size`` records (an int >= 1, or a fraction < 1) held out at random."""
    n = int(eval_size) if eval_size >= 1 else int(round(eval_size * len(records)))
    n = max(0, min(n, len(records) - 1))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
