"""Stage 2 on the native host: v1 instruction data (labels, text-only rows, truncation) and the entry
``python -m llava_contrastive.hosts.hf.finetune`` (LoRA 16-bit, QLoRA 8-bit and 4-bit through an
evaluation step, merged export)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS, EVAL_EVERY = 6, 3


# ---- data ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def processor(native_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(native_dir))


@pytest.fixture(scope="module")
def records(tiny_assets):
    return json.loads(tiny_assets.instruct_json.read_text())


def label_spans(labels):
    spans, cur = [], []
    for x in list(labels):
        if int(x) != -100:
            cur.append(int(x))
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def dataset(recs, tiny_assets, processor, max_length=512, **kw):
    from llava_contrastive.hosts.hf.instruct_data import InstructDataset

    return InstructDataset(recs, tiny_assets.instruct_image_folder, processor, image_seq_length=16,
                           max_length=max_length, **kw)


def test_v1_labels_are_the_answers(tiny_assets, processor, records):
    from llava_contrastive.hosts.hf.instruct_data import generation_prompt

    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    multi = next(r for r in records if "image" in r and len(r["conversations"]) >= 6)
    text_only = next(r for r in records if "image" not in r)
    ds = dataset([multi, text_only], tiny_assets, processor)
    assert len(ds) == 2 and ds.n_text_only == 1
    for i, rec in enumerate([multi, text_only]):
        item = ds[i]
        answers = [c["value"] + "</s>" for c in rec["conversations"] if c["from"] == "gpt"]
        decoded = [tok.decode(s).strip() for s in label_spans(item["labels"])]
        assert decoded == answers, (rec["id"], decoded)
        ids = item["input_ids"]
        image_pos = ids.eq(image_id)
        assert int(image_pos.sum()) == (16 if "image" in rec else 0)
        assert bool(item["labels"][image_pos].eq(-100).all())
        assert ("pixel_values" in item) == ("image" in rec)
    # the image tokens are one contiguous run, and training and inference tokenise alike: the row up
    # to its first "ASSISTANT:" is what the processor makes of the generation prompt
    item = ds[0]
    pos = item["input_ids"].eq(image_id).nonzero().flatten()
    assert int(pos[-1] - pos[0]) == 15
    assert item["pixel_values"].shape == (3, 64, 64)
    question = multi["conversations"][0]["value"].replace("<image>", "").strip()
    from PIL import Image

    image = Image.open(tiny_assets.instruct_image_folder / multi["image"])
    prompt = processor(images=image, text=generation_prompt(question), return_tensors="pt")["input_ids"][0]
    assert torch.equal(item["input_ids"][: len(prompt)], prompt)
    assert int(item["labels"][len(prompt)]) != -100 and bool(item["labels"][: len(prompt)].eq(-100).all())


def _upstream_python():
    py = os.environ.get("LLAVA_CONTRASTIVE_STACK_U_PYTHON") or str(REPO / ".venv" / "bin" / "python")
    if not Path(py).exists():
        if os.environ.get("LLAVA_CONTRASTIVE_REQUIRE_STACK_U") == "1":
            pytest.fail(f"stack-U python not found at {py}")
        pytest.skip(f"stack-U python not found at {py} (scripts/setup_env.sh)")
    return py


UPSTREAM_LABELS = r"""
import copy, json, sys
import transformers
from llava import conversation
from llava.train import train as T
T.conversation_lib.default_conversation = conversation.conv_templates["v1"]
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1], use_fast=False, model_max_length=4096)
tok.pad_token = tok.unk_token
class DataArgs: is_multimodal = True; mm_use_im_start_end = False
out = {}
for r in json.load(open(sys.argv[2])):
    src = copy.deepcopy([r["conversations"]])
    if "image" in r:
        src = T.preprocess_multimodal(src, DataArgs)
    labels = T.preprocess_v1(src, tok, has_image="image" in r)["labels"][0].tolist()
    spans, cur = [], []
    for x in labels + [-100]:
        if x != -100: cur.append(x)
        elif cur: spans.append(tok.decode(cur)); cur = []
    out[r["id"]] = spans
print(json.dumps(out))
"""


def test_v1_labels_match_upstream_preprocess_v1(tiny_assets, processor, records, tmp_path):
    """Upstream's own preprocess_v1 (stack U, slow legacy tokenizer) keeps the same answer spans on
    all 400 tiny records (multi-turn and text-only)."""
    py = _upstream_python()
    script = tmp_path / "upstream_labels.py"
    script.write_text(UPSTREAM_LABELS)
    proc = subprocess.run([py, str(script), str(tiny_assets.llm_dir), str(tiny_assets.instruct_json)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    upstream = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "mismatch" not in proc.stdout + proc.stderr
    ds = dataset(records, tiny_assets, processor, max_length=4096)
    ours = {r["id"]: [processor.tokenizer.decode(s) for s in label_spans(ds.encode(i)[1])]
            for i, r in enumerate(ds.records)}
    assert len(ours) == len(upstream) == 400
    diff = [k for k in ours if ours[k] != upstream[k]]
    assert not diff, (len(diff), diff[:3], ours[diff[0]], upstream[diff[0]])


def test_mixed_batch_rows_equal_single_rows(tiny_assets, native_dir, processor, records):
    """pixel_values carries only the image rows, in order; each row's logits equal its own forward."""
    from transformers import LlavaForConditionalGeneration

    from llava_contrastive.hosts.hf.instruct_data import InstructCollator

    recs = [records[0], next(r for r in records if "image" not in r), records[1]]
    ds = dataset(recs, tiny_assets, processor)
    items = [ds[i] for i in range(3)]
    collate = InstructCollator(processor.tokenizer.pad_token_id)
    batch = collate(items)
    assert batch["pixel_values"].shape[0] == 2
    assert torch.equal(batch["pixel_values"][1], items[2]["pixel_values"])
    assert "pixel_values" not in collate([items[1]])
    model = LlavaForConditionalGeneration.from_pretrained(str(native_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**batch).logits
        for r, item in enumerate(items):
            alone = model(**collate([item])).logits[0]
            n = len(item["input_ids"])
            assert torch.allclose(logits[r, :n], alone, atol=1e-5), r
        assert torch.isfinite(model(**batch).loss)


def test_truncation_never_cuts_image_tokens(tiny_assets, processor, records):
    from llava_contrastive.hosts.hf.instruct_data import RecordError

    image_rec = dict(records[0], id="img")
    text_rec = {"id": "txt", "conversations": [{"from": "human", "value": "Hi?"},
                                               {"from": "gpt", "value": "A long answer " * 20}]}
    bad = {"id": "bad", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
    full = dataset([image_rec, text_rec], tiny_assets, processor)
    image_at = int(full[0]["input_ids"].eq(processor.tokenizer.convert_tokens_to_ids("<image>")).nonzero()[0])
    limit = image_at + 15  # cuts the last of the 16 image tokens
    assert int(full[1]["labels"].ne(-100).nonzero()[0]) < limit  # the text-only row keeps some answer
    ds = dataset([image_rec, text_rec, bad], tiny_assets, processor, max_length=limit)
    assert [r["id"] for r in ds.records] == ["txt"]
    reasons = dict(ds.dropped)
    assert "id='img'" in reasons[0] and "cut through its image tokens" in reasons[0]
    assert "id='bad'" in reasons[2] and "no 'image' field" in reasons[2]
    row = ds[0]
    assert len(row["input_ids"]) == limit and int(row["labels"].ne(-100).sum()) > 0
    with pytest.raises(RecordError, match="id='img'.*cut through"):
        dataset([image_rec, text_rec], tiny_assets, processor, max_length=limit, strict=True)
    # just after the image tokens: no answer token would be left
    ds = dataset([image_rec, text_rec], tiny_assets, processor, max_length=image_at + 16)
    assert any("no answer token left" in r for _, r in ds.dropped)


def test_contrastive_term_refused(tiny_assets, native_dir, tmp_path):
    from llava_contrastive.hosts.hf import finetune

    with pytest.raises(ValueError, match="refused in stage 2"):
        finetune.main(["--model_name_or_path", str(native_dir), "--data_path", str(tiny_assets.instruct_json),
                       "--output_dir", str(tmp_path), "--contrastive_weight", "0.5"])


# ---- the entry -----------------------------------------------------------------------------------
_RUNS = {}


def run_entry(bits, tiny_assets, native_dir, root):
    """One short run per bits setting (shared by the tests below):
    16: projector lr 2e-4; 8: upstream-keys stage-1 projector with --mm_projector_lr 0 (must come back
    unchanged); 4: native-keys stage-1 projector, gradient checkpointing."""
    if bits in _RUNS:
        return _RUNS[bits]
    from llava_contrastive.hosts.hf import convert

    out = root / f"bits{bits}"
    torch.manual_seed(bits)
    proj = {f"model.mm_projector.{i}.{p}": torch.randn(64, 64) * 0.05 if p == "weight" else torch.randn(64) * 0.01
            for i in (0, 2) for p in ("weight", "bias")}
    extra = {16: ["--mm_projector_lr", "2e-4"],
             8: ["--mm_projector_lr", "0", "--pretrain_mm_mlp_adapter", str(root / "proj_upstream.bin")],
             4: ["--mm_projector_lr", "1e-3", "--pretrain_mm_mlp_adapter", str(root / "proj_native.safetensors"),
                 "--gradient_checkpointing", "True"]}[bits]
    convert.save_state(proj, root / "proj_upstream.bin")
    convert.save_state(convert.upstream_to_native(proj), root / "proj_native.safetensors")
    cmd = [sys.executable, "-m", "llava_contrastive.hosts.hf.finetune", "--model_name_or_path", str(native_dir),
           "--data_path", str(tiny_assets.instruct_json), "--image_folder", str(tiny_assets.instruct_image_folder),
           "--output_dir", str(out), "--bits", str(bits), "--lora_r", "8", "--lora_alpha", "16",
           "--lora_dropout", "0", "--learning_rate", "2e-3", "--max_steps", str(STEPS),
           "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--eval_size", "8",
           "--eval_strategy", "steps", "--eval_steps", str(EVAL_EVERY), "--save_strategy", "steps",
           "--save_steps", str(EVAL_EVERY), "--logging_steps", "1", "--log_grad_norms", "True",
           "--model_max_length", "256", "--image_aspect_ratio", "pad", "--report_to", "none",
           "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "0",
           "--merge_and_export", str(out / "merged")] + extra
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", LLAVA_CONTRASTIVE_QUIET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    _RUNS[bits] = (out, proc, proj)
    return _RUNS[bits]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    _RUNS.clear()
    yield tmp_path_factory.mktemp("stage2")
    _RUNS.clear()


def lora_tensors(path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path / "adapter_model.safetensors")).items() if "lora_" in k}


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_entry_trains_through_eval_step(bits, tiny_assets, native_dir, runs_root):
    out, proc, proj = run_entry(bits, tiny_assets, native_dir, runs_root)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in train] == list(range(1, STEPS + 1))
    assert [h["step"] for h in evals] == [EVAL_EVERY, STEPS]
    assert all(math.isfinite(h["loss"]) for h in train) and all(math.isfinite(h["eval_loss"]) for h in evals)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"], evals  # same held-out rows: the loss fell
    # after the evaluation step, every LoRA tensor still gets a non-zero gradient ...
    after = [h for h in train if h["step"] > EVAL_EVERY]
    assert all(h["lora_grad_nonzero"] == 1.0 and h["lora_grad_norm"] > 1e-4 for h in after), after
    assert all(h["projector_grad_norm"] > 1e-4 for h in after), after
    # ... and the weights keep moving: checkpoint-3 (written after that eval) vs checkpoint-6
    before, later = lora_tensors(out / f"checkpoint-{EVAL_EVERY}"), lora_tensors(out / f"checkpoint-{STEPS}")
    assert before.keys() == later.keys() and len(before) == 28  # 2 layers x 7 projections x (A, B)
    unchanged = [k for k in before if torch.equal(before[k], later[k])]
    assert not unchanged, unchanged[:4]
    # outputs
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(native_dir) and cfg["r"] == 8
    assert any("multi_modal_projector" in m for m in cfg["modules_to_save"])
    saved = torch.load(out / "mm_projector.bin", weights_only=True)
    assert sorted(saved) == sorted(proj)
    if bits == 8:  # stage-1 projector loaded (upstream keys), and --mm_projector_lr 0 is its own group
        assert all(torch.equal(saved[k], proj[k]) for k in proj)
    else:
        assert not any(torch.equal(saved[k], proj[k]) for k in proj)
    if bits == 4:
        assert "CPU inference repacking disabled on 14 Linear4bit layers" in proc.stderr


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_merged_export_loads_generates_and_matches_peft(bits, tiny_assets, native_dir, runs_root, processor, records):
    """The export is a plain native checkpoint (float32 base reloaded for 4/8-bit runs): it loads with
    LlavaForConditionalGeneration + AutoProcessor, generates, and has the PEFT model's logits."""
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_contrastive.hosts.hf.instruct_data import InstructCollator, generation_prompt

    out, _, _ = run_entry(bits, tiny_assets, native_dir, runs_root)
    merged_dir = out / "merged"
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config and "contrastive" not in config
    merged = LlavaForConditionalGeneration.from_pretrained(str(merged_dir)).eval()
    proc = AutoProcessor.from_pretrained(str(merged_dir))
    assert merged.dtype == torch.float32
    saved = torch.load(out / "mm_projector.bin", weights_only=True)
    assert torch.equal(merged.model.multi_modal_projector.linear_1.weight, saved["model.mm_projector.0.weight"])

    peft = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(str(native_dir), dtype=torch.float32), str(out)).eval()
    recs = [records[0], next(r for r in records if "image" not in r), records[1]]
    ds = dataset(recs, tiny_assets, proc)
    batch = InstructCollator(proc.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        a, b = merged(**batch).logits[mask], peft(**batch).logits[mask]
        with peft.disable_adapter():
            base = peft(**batch).logits[mask]
    diff = float((a - b).abs().max())
    print(f"bits={bits}: max |merged - peft| logits = {diff:.2e}, max |peft - base| = {float((b - base).abs().max()):.3f}")
    assert diff < 5e-5
    assert float((b - base).abs().max()) > 1e-2  # the adapter does something

    from PIL import Image

    image = Image.open(tiny_assets.instruct_image_folder / records[0]["image"])
    inputs = proc(images=image, text=generation_prompt("Where is the red diamond?"), return_tensors="pt")
    gen = merged.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]
