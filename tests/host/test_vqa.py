"""`python -m llava_contrastive.vqa` (upstream host) against a plain greedy loop over upstream's own
prompt code; resume, chunks, and upstream's answers-file fields."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from llava_contrastive.evaluation.vqa import ANSWER_KEYS, get_chunk, iter_answers
from llava_contrastive.hosts.llava import vqa as host


@pytest.fixture(scope="module")
def questions(tiny_assets, tmp_path_factory) -> Path:
    """Image questions from the instruct data, then text-only ones (the textqa case), then images again."""
    records = json.loads(tiny_assets.instruct_json.read_text())
    image = [r for r in records if "image" in r][:13]
    text = [r for r in records if "image" not in r][:4]
    rows = []
    for i, r in enumerate(image[:9] + text + image[9:]):
        q = {"question_id": f"q{i}", "text": r["conversations"][0]["value"].replace("<image>", "").strip()}
        if "image" in r:
            q["image"] = r["image"]
        rows.append(q)
    path = tmp_path_factory.mktemp("vqa") / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in rows))
    return path


def reference_answers(model_path, model_base, question_file: Path, image_folder, conv_mode: str, max_new: int) -> dict:
    """A plain loop, batch 1: upstream's prompt building and model.generate, as model_vqa_loader does."""
    from PIL import Image

    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    tokenizer, model, processor, _ = host.load_model(str(model_path), str(model_base) if model_base else None,
                                                     "cpu", torch.float32)
    out = {}
    for q in map(json.loads, question_file.read_text().splitlines()):
        qs = DEFAULT_IMAGE_TOKEN + "\n" + q["text"] if "image" in q else q["text"]
        conv = conv_templates[conv_mode].copy()
        conv.append_message(conv.roles[0], qs)
        conv.append_message(conv.roles[1], None)
        ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
        kwargs = {}
        if "image" in q:
            img = Image.open(os.path.join(image_folder, q["image"])).convert("RGB")
            kwargs = dict(images=process_images([img], processor, model.config).to(model.dtype), image_sizes=[img.size])
        with torch.inference_mode():
            gen = model.generate(ids, do_sample=False, max_new_tokens=max_new, use_cache=True, **kwargs)
        out[q["question_id"]] = tokenizer.batch_decode(gen, skip_special_tokens=True)[0].strip()
    return out


def vqa_args(model_path, model_base, questions, image_folder, answers, conv_mode, batch, *extra):
    args = ["--model-path", str(model_path), "--question-file", str(questions), "--image-folder", str(image_folder),
            "--answers-file", str(answers), "--conv-mode", conv_mode, "--temperature", "0",
            "--max_new_tokens", "12", "--batch_size", str(batch), "--no_progress", *extra]
    return args + (["--model-base", str(model_base)] if model_base else [])


CASES = {  # stage 1 with the plain template gives varied answers on the tiny model; stage 2 is the real use
    "stage1-plain": ("stage1_dir", True, "plain"),
    "lora-v1": ("stage2_lora_dir", True, "vicuna_v1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_answers_equal_plain_greedy_loop(case, request, tiny_assets, questions, tmp_path):
    fixture, needs_base, conv = CASES[case]
    model_path = request.getfixturevalue(fixture)
    base = tiny_assets.llm_dir if needs_base else None
    folder = tiny_assets.instruct_image_folder
    ref = reference_answers(model_path, base, questions, folder, conv, 12)
    if case == "stage1-plain":
        assert len(set(ref.values())) > 3, ref  # the comparison has teeth
    for batch in (1, 4):
        answers = tmp_path / f"answers-{batch}.jsonl"
        result = host.run(vqa_args(model_path, base, questions, folder, answers, conv, batch))
        assert result.written == len(ref)
        lines = list(iter_answers(str(answers)))
        assert {a["question_id"]: a["text"] for a in lines} == ref, f"batch {batch}"
        assert [tuple(a) for a in lines] == [ANSWER_KEYS] * len(lines)  # upstream's keys, in its order
        assert all(a["model_id"] == model_path.name and a["metadata"] == {} and len(a["answer_id"]) == 22
                   for a in lines)
        assert [a["prompt"] for a in lines] == [json.loads(q)["text"] for q in questions.read_text().splitlines()]


def test_resume_and_chunks(stage1_dir, tiny_assets, questions, tmp_path):
    base, folder = tiny_assets.llm_dir, tiny_assets.instruct_image_folder
    full = tmp_path / "full.jsonl"
    host.run(vqa_args(stage1_dir, base, questions, folder, full, "plain", 4))
    full_lines = full.read_text().splitlines()
    ids = [json.loads(line)["question_id"] for line in full_lines]

    # killed after k answers, with the (k+1)-th line half written: rerunning appends only the missing ones
    k = 5
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text("\n".join(full_lines[:k]) + "\n" + full_lines[k][:17])
    result = host.run(vqa_args(stage1_dir, base, questions, folder, resumed, "plain", 4))
    assert (result.skipped, result.written) == (k, len(ids) - k)
    lines = resumed.read_text().splitlines()
    assert lines[:k] == full_lines[:k]  # kept as they were (same answer ids)
    assert [json.loads(x)["question_id"] for x in lines] == ids
    assert [json.loads(x)["text"] for x in lines] == [json.loads(x)["text"] for x in full_lines]
    again = host.run(vqa_args(stage1_dir, base, questions, folder, resumed, "plain", 4))
    assert again.written == 0 and resumed.read_text().splitlines() == lines

    # chunks: the union of the chunk files is the unchunked file (answer ids aside)
    union = []
    for idx in range(3):
        part = tmp_path / f"chunk{idx}.jsonl"
        host.run(vqa_args(stage1_dir, base, questions, folder, part, "plain", 2, "--num-chunks", "3",
                          "--chunk-idx", str(idx)))
        union += list(iter_answers(str(part)))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "answer_id"} for r in rows]  # noqa: E731
    assert strip(union) == strip(list(iter_answers(str(full))))


def test_get_chunk_matches_upstream():
    from llava.eval.model_vqa_loader import get_chunk as upstream_get_chunk

    for n_items in range(0, 23):
        items = list(range(n_items))
        for n in range(1, 9):
            for k in range(n):
                try:
                    want = upstream_get_chunk(items, n, k)
                except (IndexError, ValueError):  # upstream fails (fewer chunks than asked, no items): ours is empty
                    want = []
                assert get_chunk(items, n, k) == want, (n_items, n, k)


def test_user_errors_exit_2(tmp_path, capsys):
    from llava_contrastive.vqa import main

    assert main(["--model-path", str(tmp_path / "missing"), "--question-file", str(tmp_path / "q.jsonl")]) == 2
    assert "--model-path" in capsys.readouterr().err
    (tmp_path / "q.jsonl").write_text('{"question_id": 1}\n')
    (tmp_path / "m").mkdir()
    assert main(["--model-path", str(tmp_path / "m"), "--question-file", str(tmp_path / "q.jsonl")]) == 2
    assert "missing ['text']" in capsys.readouterr().err
    assert main(["--model-path", str(tmp_path / "m"), "--question-file", str(tmp_path / "q.jsonl"),
                 "--num-chunks", "2", "--chunk-idx", "2"]) == 2
