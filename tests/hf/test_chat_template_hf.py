"""Stage 2 and VQA in the LLM tokenizer's own chat template (``--version chat_template`` /
``--conv-mode chat_template``), on the tiny Qwen2 whose tokenizer carries ChatML."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_contrastive.hosts.hf.instruct_data import (ChatTemplateTokenizer, build_chat_prompt, chat_generation_prompt,
                                                      chat_turn_end_ids, turns_of)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def qwen2_native(tiny_assets, tmp_path_factory):
    from llava_contrastive.dev.tiny import build_family_llm
    from llava_contrastive.hosts.hf.convert import build_native_llava

    out = tmp_path_factory.mktemp("chat") / "llava-qwen2-tiny"
    build_native_llava(build_family_llm(tiny_assets, "qwen2"), tiny_assets.vision_dir, out, seed=0)
    return out


def test_labels_are_the_answers_with_their_end_marker_and_prompts_agree(tiny_assets, qwen2_native):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(qwen2_native))
    tok = processor.tokenizer
    assert "<|im_start|>" in tok.chat_template  # the LLM's template survived the processor's save
    image_id = tok.convert_tokens_to_ids("<image>")
    record = next(r for r in json.loads(tiny_assets.instruct_json.read_text())
                  if "image" in r and len(r["conversations"]) >= 4)
    turns = turns_of(record)
    text, spans = build_chat_prompt(tok, turns)
    answers = [t for role, t in turns if role == "ASSISTANT"]
    assert [text[a:b] for a, b in spans] == [a + "<|im_end|>" for a in answers]
    enc = ChatTemplateTokenizer(tok, image_id).encode(record)
    assert enc.input_ids == tok(text, add_special_tokens=False).input_ids and enc.input_ids.count(image_id) == 1
    kept = tok.decode([t for t in enc.labels if t != -100])
    assert kept == "".join(a + "<|im_end|>" for a in answers)
    # the VQA prompt of the first question is the training text up to its answer
    first_question = turns[0][1].replace("<image>\n", "")
    assert text[:spans[0][0]] == chat_generation_prompt(tok, first_question, has_image=True)
    assert chat_turn_end_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_a_tokenizer_without_a_template_is_refused_with_the_fix():
    from transformers import AutoTokenizer

    from llava_contrastive.dev.tiny import build_tiny_assets

    tok = AutoTokenizer.from_pretrained(str(build_tiny_assets(REPO / "playground" / "tiny").llm_dir))
    with pytest.raises(ValueError, match="--version v1"):
        ChatTemplateTokenizer(tok, 0)


@pytest.mark.slow
def test_stage2_in_chatml_then_vqa_answers_equal_a_greedy_loop(tiny_assets, qwen2_native, tmp_path):
    """LoRA stage 2 with --version chat_template (merged), then VQA with --conv-mode chat_template:
    each answer is a plain greedy generate on the ChatML prompt, cut at <|im_end|>."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_contrastive.evaluation.vqa import iter_answers
    from llava_contrastive.hosts.hf import vqa as host
    from llava_contrastive.hosts.hf.instruct_data import expand2square

    out = tmp_path / "stage2"
    cmd = [sys.executable, "-m", "llava_contrastive.hosts.hf.finetune", "--model_name_or_path", str(qwen2_native),
           "--version", "chat_template", "--data_path", str(tiny_assets.instruct_json),
           "--image_folder", str(tiny_assets.instruct_image_folder), "--output_dir", str(out), "--lora_r", "8",
           "--lora_alpha", "16", "--learning_rate", "2e-3", "--max_steps", "4", "--per_device_train_batch_size", "4",
           "--save_strategy", "no", "--logging_steps", "1", "--model_max_length", "256", "--image_aspect_ratio", "pad",
           "--report_to", "none", "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "0",
           "--merge_and_export", str(out / "merged")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged = out / "merged"

    records = [r for r in json.loads(tiny_assets.instruct_json.read_text()) if "image" in r][:4]
    rows = [{"question_id": i, "image": r["image"], "text": r["conversations"][0]["value"].replace("<image>", "").strip()}
            for i, r in enumerate(records)]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in rows))
    model = LlavaForConditionalGeneration.from_pretrained(str(merged), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(merged))
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    mean = tuple(int(x * 255) for x in processor.image_processor.image_mean)
    ref = {}
    for q in rows:
        prompt = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + q["text"]}], tokenize=False,
                                         add_generation_prompt=True)
        image = expand2square(Image.open(tiny_assets.instruct_image_folder / q["image"]).convert("RGB"), mean)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:].tolist()
        cut = next((k for k, t in enumerate(gen) if t in (end, tok.eos_token_id)), len(gen))
        ref[q["question_id"]] = tok.decode(gen[:cut], skip_special_tokens=True).strip()
    answers = tmp_path / "answers.jsonl"
    host.run(["--model-path", str(merged), "--question-file", str(qfile), "--answers-file", str(answers),
              "--image-folder", str(tiny_assets.instruct_image_folder), "--conv-mode", "chat_template",
              "--temperature", "0", "--max_new_tokens", "12", "--batch_size", "2", "--no_progress"])
    assert {a["question_id"]: a["text"] for a in iter_answers(str(answers))} == ref
