"""`python -m llava_contrastive.vqa --host hf` against a plain greedy generate loop (batch 1)."""
from __future__ import annotations

import json

import torch

from llava_contrastive.evaluation.vqa import ANSWER_KEYS, iter_answers
from llava_contrastive.hosts.hf import vqa as host


def test_hf_answers_equal_plain_greedy_loop(native_dir, tiny_assets, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    records = json.loads(tiny_assets.instruct_json.read_text())
    picked = [r for r in records if "image" in r][:7] + [r for r in records if "image" not in r][:3]
    rows = []
    for i, r in enumerate(picked):
        q = {"question_id": i, "text": r["conversations"][0]["value"].replace("<image>", "").strip()}
        if "image" in r:
            q["image"] = r["image"]
        rows.append(q)
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in rows))

    model = LlavaForConditionalGeneration.from_pretrained(str(native_dir), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(native_dir))
    mean = tuple(int(x * 255) for x in processor.image_processor.image_mean)
    ref = {}
    for q in rows:  # plain loop: one question, no padding
        from PIL import Image

        from llava_contrastive.hosts.hf.instruct_data import expand2square

        prompt = ("<image>\n" if "image" in q else "") + q["text"]
        images = [expand2square(Image.open(tiny_assets.instruct_image_folder / q["image"]).convert("RGB"), mean)] \
            if "image" in q else None
        inputs = processor(text=[prompt], images=images, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=10)
        ref[q["question_id"]] = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                                                           skip_special_tokens=True).strip()
    assert len(set(ref.values())) > 2, ref
    for batch in (1, 4):
        answers = tmp_path / f"a{batch}.jsonl"
        host.run(["--model-path", str(native_dir), "--question-file", str(qfile), "--answers-file", str(answers),
                  "--image-folder", str(tiny_assets.instruct_image_folder), "--conv-mode", "plain",
                  "--temperature", "0", "--max_new_tokens", "10", "--batch_size", str(batch), "--no_progress"])
        lines = list(iter_answers(str(answers)))
        assert {a["question_id"]: a["text"] for a in lines} == ref, f"batch {batch}"
        assert [tuple(a) for a in lines] == [ANSWER_KEYS] * len(lines)
