"""LLaVA-Pretrain records -> native LLaVA batches, through the LlavaProcessor's image processor
and tokenizer, in upstream's ``plain`` template:

    [bos] <image> x image_seq_length  caption tokens  "\n"       labels: -100 on bos and image

The caption is tokenised on its own (``add_special_tokens=False``) exactly like upstream's
``tokenizer_image_token`` tokenises the chunk after ``<image>``; the instruction of the human turn
is dropped, as upstream's plain template does.

Images are opened in ``__getitem__``: in training the dataset is wrapped in the core's
``data_guard.GuardedDataset`` (records that fail to load then), after the pre-flight data check
(``data/check.py``) has dropped (``--data_check_policy skip``) or refused (``error``) bad records.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

IGNORE_INDEX = -100


class PretrainDataset(Dataset):
    def __init__(self, data_path, image_folder, processor, image_seq_length: int, max_length: int = 256,
                 records: Optional[List[dict]] = None):
        """``records``: the records to use (e.g. the checked ones) instead of reading ``data_path``."""
        if records is None:
            with open(data_path) as f:
                records = json.load(f)
        self.records = records
        self.image_folder = str(image_folder)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.image_seq_length = int(image_seq_length)
        self.max_length = int(max_length)
        if self.max_length < self.image_seq_length + 3:
            raise ValueError(f"--model_max_length {self.max_length} leaves no caption tokens after bos and the "
                             f"{self.image_seq_length} image tokens: use at least {self.image_seq_length + 3} "
                             f"(upstream's stage 1 uses 2048)")

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, record) -> str:
        return record["conversations"][1]["value"]

    def __getitem__(self, i) -> Dict[str, torch.Tensor]:
        record = self.records[i]
        tok = self.tokenizer
        caption_ids = tok(self.caption(record) + "\n", add_special_tokens=False).input_ids
        prefix = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + [self.image_token_id] * self.image_seq_length
        caption_ids = caption_ids[: self.max_length - len(prefix)]
        input_ids = torch.tensor(prefix + caption_ids, dtype=torch.long)
        labels = input_ids.clone()
        labels[: len(prefix)] = IGNORE_INDEX
        image = Image.open(os.path.join(self.image_folder, record["image"])).convert("RGB")
        pixel_values = self.processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


class Collator:
    """Right-pads ``input_ids`` / ``labels`` / ``attention_mask``; ``pixel_values`` holds the images
    of the rows that have one, in row order (the native model scatters image features into the image
    tokens in order), and is absent when no row has an image. Stage 1 (every row has an image) and
    stage 2 (text-only rows allowed, ``instruct_data.py``) share it."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        n = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(items), n), dtype=torch.long)
        for r, x in enumerate(items):
            k = len(x["input_ids"])
            ids[r, :k], labels[r, :k], attention[r, :k] = x["input_ids"], x["labels"], 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
        images = [x["pixel_values"] for x in items if "pixel_values" in x]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch
