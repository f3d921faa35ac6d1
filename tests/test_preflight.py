"""llava_contrastive.training.preflight: the pure checks, on hand-made file trees (no model, no subprocess)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.training import preflight as pf

OFFLINE = {"HF_HUB_OFFLINE": "1"}


# ---- a small stage-1 tree: LLM and tower dirs, a JSON corpus, its images -------------------------
@pytest.fixture()
def tree(tmp_path) -> Path:
    for d in ("llm", "tower"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
    images = tmp_path / "images" / "00000"
    images.mkdir(parents=True)
    records = []
    for i in range(60):
        name = f"00000/{i:09d}.jpg"
        (tmp_path / "images" / name).write_bytes(b"jpg")
        records.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"caption {i}"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "adapter.bin").write_bytes(b"x")
    return tmp_path


def argv(tree: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(tree / "llm"), "--version", "plain", "--data_path", str(tree / "data.json"),
            "--image_folder", str(tree / "images"), "--vision_tower", str(tree / "tower"),
            "--mm_projector_type", "mlp2x_gelu", "--tune_mm_mlp_adapter", "True", "--mm_vision_select_layer", "-2",
            "--mm_use_im_start_end", "False", "--output_dir", str(tree / "out"), "--per_device_train_batch_size",
            "8", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--max_steps", "4",
            "--report_to", "none", "--deepspeed", "zero2.json", *extra]


def check(tree, *extra, env=None, host="llava"):
    return pf.check_command(argv(tree, *extra), host, env=env or {}, cwd=str(tree))


def only(problems, severity=None):
    assert len(problems) == 1, problems
    if severity:
        assert problems[0].severity == severity
    return problems[0].message


def test_the_recipe_passes(tree):
    assert check(tree) == []


# ---- parsing --------------------------------------------------------------------------------------
def test_parse_fills_defaults_and_records_given_flags(tree):
    cmd = pf.parse_command(["--seed", "7", "--mm_use_im_start_end", "--contrastive_lr", "1e-4",
                            "--contrastive_gather", "false", "--unknown_flag", "x"], "llava")
    assert cmd["seed"] == 7 and cmd["mm_use_im_start_end"] is True  # a bare boolean flag means True
    assert cmd["contrastive_lr"] == 1e-4 and cmd["contrastive_gather"] is False
    assert cmd["version"] == "v0" and cmd["contrastive_weight"] == 0.5  # upstream / plugin defaults
    assert cmd.given == {"seed", "mm_use_im_start_end", "contrastive_lr", "contrastive_gather"}
    assert pf.parse_command(["--seed", "1", "--seed", "2"], "llava")["seed"] == 2  # last wins, as in argparse


def test_default_tables_match_the_real_argument_classes():
    """The defaults pre-flight assumes are upstream's (llava.train.train + transformers 4.37)."""
    upstream = pytest.importorskip("llava.train.train")
    real = {}
    for cls in (upstream.ModelArguments, upstream.DataArguments, upstream.TrainingArguments):
        real.update({f.name: f.default for f in dataclasses.fields(cls)})
    for name, default in pf.HOST_DEFAULTS["llava"].items():
        if name == "output_dir":
            continue  # required upstream
        assert real[name] == default, name
    assert pf.parse_command([], "llava").contrastive == ContrastiveArguments()


# ---- template, start/end tokens, inert flags ------------------------------------------------------
def test_template_other_than_plain_with_the_contrastive_term(tree):
    msg = only(check(tree, "--version", "v1"), "error")
    assert "--version v1" in msg and "--version plain" in msg and "--contrastive_weight 0" in msg
    assert check(tree, "--version", "v1", "--contrastive_weight", "0") == []  # stage 2


def test_start_end_tokens_with_the_contrastive_term(tree):
    msg = only(check(tree, "--mm_use_im_start_end", "True"), "error")
    assert "--mm_use_im_start_end True" in msg and "--mm_use_im_start_end False" in msg
    assert check(tree, "--mm_use_im_start_end", "True", "--contrastive_weight", "0") == []


@pytest.mark.parametrize("flag,value", [("--contrastive_prompt", "e5v"), ("--contrastive_text_layer", "-2"),
                                        ("--contrastive_text_cache", "/tmp/cache")])
def test_text_flags_inert_with_input_embeds(tree, flag, value):
    msg = only(check(tree, flag, value), "warning")
    assert f"{flag} is unused with --contrastive_text_source input_embeds" in msg
    assert "--contrastive_text_source llm" in msg
    assert check(tree, flag, value, "--contrastive_text_source", "llm") == []


def test_contrastive_flags_inert_with_weight_zero(tree):
    msg = only(check(tree, "--contrastive_weight", "0", "--contrastive_lr", "1e-4", "--contrastive_loss", "siglip"),
               "warning")
    assert msg.startswith("--contrastive_loss, --contrastive_lr have no effect with --contrastive_weight 0")


def test_other_inert_flags(tree):
    assert "--contrastive_image_layer is unused" in only(check(tree, "--contrastive_image_layer", "-3"))
    assert "--contrastive_head_dim is unused" in only(check(tree, "--contrastive_head_dim", "32"))
    assert check(tree, "--contrastive_head", "linear", "--contrastive_head_dim", "32") == []


def test_invalid_contrastive_value_is_an_error(tree):
    msg = only(check(tree, "--contrastive_loss", "triplet"), "error")
    assert "--contrastive_loss 'triplet' is not one of infonce, siglip" in msg


# ---- models and towers ----------------------------------------------------------------------------
@pytest.mark.parametrize("value,local", [
    ("/abs/x", True), ("./x", True), ("~/x", True), ("../x", True), ("a/b/c", True),
    ("lmsys/vicuna-13b-v1.5", False), ("gpt2", False), ("checkpoints/run1", True),  # "checkpoints" exists in cwd
])
def test_looks_local(tmp_path, value, local):
    (tmp_path / "checkpoints").mkdir()
    assert pf.looks_local(value, cwd=str(tmp_path)) is local


def test_missing_tower_path_is_path_not_found(tree):
    msg = only(check(tree, "--vision_tower", str(tree / "no-such-tower")), "error")
    assert msg.startswith(f"--vision_tower {tree / 'no-such-tower'}: path not found")
    msg = only(check(tree, "--model_name_or_path", "./models/vicuna"), "error")
    assert msg.startswith("--model_name_or_path ./models/vicuna: path not found")


def test_hub_id_offline_needs_the_cache(tree):
    cache = tree / "hub"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    msg = only(check(tree, "--vision_tower", "openai/clip-vit-large-patch14-336", env=env), "error")
    assert "offline mode is on" in msg and "openai/clip-vit-large-patch14-336" in msg and str(cache) in msg
    snap = cache / "models--openai--clip-vit-large-patch14-336" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert check(tree, "--vision_tower", "openai/clip-vit-large-patch14-336", env=env) == []
    assert check(tree, "--model_name_or_path", "lmsys/vicuna-13b-v1.5", env={}) == []  # online: left to the hub


def test_hf_home_locates_the_cache():
    assert pf.hf_cache_dir({"HF_HOME": "/h"}) == "/h/hub"
    assert pf.hf_cache_dir({"HF_HOME": "/h", "HF_HUB_CACHE": "/c"}) == "/c"


def test_upstream_unknown_tower_id(tree):
    msg = only(check(tree, "--vision_tower", "google/siglip-so400m-patch14-384"), "error")
    assert "openai/ or laion/" in msg and "Unknown vision tower" in msg


def test_missing_adapter(tree):
    msg = only(check(tree, "--pretrain_mm_mlp_adapter", str(tree / "nope.bin")), "error")
    assert msg.startswith(f"--pretrain_mm_mlp_adapter {tree / 'nope.bin'}: file not found")
    assert check(tree, "--pretrain_mm_mlp_adapter", str(tree / "adapter.bin")) == []


def test_native_host_flags(tree):
    base = ["--data_path", str(tree / "data.json"), "--image_folder", str(tree / "images"),
            "--output_dir", str(tree / "out")]
    assert pf.check_command(base + ["--llm_dir", str(tree / "llm"), "--vision_dir", str(tree / "tower")], "hf",
                            env={}) == []
    msg = only(pf.check_command(base + ["--llm_dir", str(tree / "llm"), "--vision_dir", str(tree / "x")], "hf",
                                env={}), "error")
    assert msg.startswith(f"--vision_dir {tree / 'x'}: path not found")
    assert "no model given" in only(pf.check_command(base, "hf", env={}), "error")
    # --version does not exist in the native host: never a template error there
    assert pf.check_command(base + ["--model_name_or_path", str(tree / "llm"), "--version", "v1"], "hf",
                            env={}) == []


# ---- data -------------------------------------------------------------------------------------------
def test_head_records_reads_only_what_it_needs(tmp_path):
    records = [{"id": i, "image": f"{i}.jpg"} if i % 3 else {"id": i, "text_only": "x" * 50} for i in range(40)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records, indent=1))
    reference = [r for r in json.loads(path.read_text()) if r.get("image")]  # json.load + a filter
    for chunk in (7, 64, 1 << 20):  # buffer refills in the middle of records
        is_list, got = pf.head_records(str(path), 10, chunk=chunk)
        assert is_list and got == reference[:10]
        assert pf.head_records(str(path), 1000, chunk=chunk)[1] == reference
    (tmp_path / "o.json").write_text('{"a": 1}')
    assert pf.head_records(str(tmp_path / "o.json"), 5) == (False, [])
    (tmp_path / "l.jsonl").write_text('{"image": "a"}\n{"image": "b"}\n')
    assert pf.head_records(str(tmp_path / "l.jsonl"), 5) == (False, [])


def test_missing_data_path(tree):
    msg = only(check(tree, "--data_path", str(tree / "nope.json")), "error")
    assert msg.startswith(f"--data_path {tree / 'nope.json'} does not exist")
    assert "is a directory" in only(check(tree, "--data_path", str(tree / "images")))


def test_data_not_a_json_list(tree):
    (tree / "d.json").write_text('{"records": []}')
    assert "not a JSON list of records" in only(check(tree, "--data_path", str(tree / "d.json")), "error")


def test_every_image_missing_names_the_folder_and_first_path(tree):
    wrong = tree / "llm"  # exists, holds none of the images
    msg = only(check(tree, "--image_folder", str(wrong)), "error")
    first = json.loads((tree / "data.json").read_text())[0]["image"]
    assert msg.startswith(f"every image missing: check --image_folder, first missing path is {wrong / first}")
    assert "first 50 records" in msg  # the sample, not the whole corpus


def test_some_images_missing_is_left_to_the_data_check(tree):
    for p in sorted((tree / "images" / "00000").iterdir())[1:]:
        p.unlink()  # one image of 60 left
    assert check(tree) == []


def test_image_folder_missing_or_not_given(tree):
    msg = only(check(tree, "--image_folder", str(tree / "nowhere")), "error")
    assert msg.startswith(f"--image_folder {tree / 'nowhere'} does not exist")
    args = [a for a in argv(tree) if a not in ("--image_folder", str(tree / "images"))]
    assert "--image_folder is not given" in only(pf.check_command(args, "llava", env={}, cwd=str(tree)))


# ---- output directory and resume safety --------------------------------------------------------------
def start_run(tree, *extra, env=None):
    """What a started run leaves: run_settings.json (via the entries' own function) + a checkpoint."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tree)
        for k, v in (env or {}).items():
            mp.setenv(k, v)
        pf.run_preflight(argv(tree, *extra), "llava", stream=io.StringIO())
    (tree / "out" / "checkpoint-2").mkdir()


def test_run_settings_written_atomically_with_the_global_batch(tree, monkeypatch):
    start_run(tree, "--gradient_accumulation_steps", "4", env={"WORLD_SIZE": "2"})
    names = os.listdir(tree / "out")
    assert pf.RUN_SETTINGS_FILE in names and not [n for n in names if ".tmp-" in n]
    saved = json.loads((tree / "out" / pf.RUN_SETTINGS_FILE).read_text())
    assert saved["compared"]["global_batch"] == 8 * 4 * 2
    assert saved["compared"]["data_fingerprint"] == {
        "size": (tree / "data.json").stat().st_size,
        "sha256": hashlib.sha256((tree / "data.json").read_bytes()).hexdigest()}
    assert saved["compared"]["model_name_or_path"] == str((tree / "llm").resolve())
    assert saved["compared"]["contrastive_weight"] == 0.5 and "max_steps" not in saved["compared"]


def test_same_command_resumes_silently(tree):
    start_run(tree)
    assert check(tree) == []
    # settings that may change on resume
    assert check(tree, "--max_steps", "100", "--save_steps", "5", "--report_to", "wandb",
                 "--dataloader_num_workers", "4", "--logging_steps", "10") == []


def test_mixed_run_refused_naming_each_difference(tree):
    start_run(tree)
    msg = only(check(tree, "--contrastive_weight", "2.0", "--per_device_train_batch_size", "16"), "error")
    assert "--contrastive_weight 0.5 -> 2.0" in msg and "global_batch 8 -> 16" in msg
    assert "--output_dir" in msg and "--overwrite_output_dir True" in msg
    assert "--contrastive_loss" not in msg  # only what differs


def test_global_batch_compares_the_product(tree, monkeypatch):
    start_run(tree)  # 8 x 1 x 1
    assert check(tree, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2") == []
    msg = only(check(tree, env={"WORLD_SIZE": "2"}), "error")  # e.g. a HOSTFILE that doubles the ranks
    assert "global_batch 8 -> 16" in msg


def test_data_identified_by_content(tree):
    start_run(tree)
    copy = tree / "copy.json"
    copy.write_bytes((tree / "data.json").read_bytes())
    assert check(tree, "--data_path", str(copy)) == []  # the same corpus on local scratch
    records = json.loads(copy.read_text())[:-1]
    copy.write_text(json.dumps(records))
    msg = only(check(tree, "--data_path", str(copy)), "error")
    assert "data_fingerprint" in msg


def test_model_rebuilt_in_place_refused_naming_its_files(tree):
    """The same paths holding other weights or another tokenizer (e.g. assets rebuilt) are another model."""
    (tree / "llm" / "model.safetensors").write_bytes(b"weights v1")
    (tree / "tower" / "README.md").write_text("notes")
    start_run(tree)
    saved = json.loads((tree / "out" / pf.RUN_SETTINGS_FILE).read_text())["compared"]["model_files"]
    assert set(saved) == {"model_name_or_path", "vision_tower"}  # adapter not given, docs skipped
    assert saved["model_name_or_path"]["model.safetensors"] == hashlib.sha256(b"weights v1").hexdigest()[:16]
    assert saved["vision_tower"] == {"config.json": hashlib.sha256(b"{}").hexdigest()[:16]}
    (tree / "tower" / "README.md").write_text("other notes")
    assert check(tree) == []  # docs do not make another model
    (tree / "llm" / "model.safetensors").write_bytes(b"weights v2")
    (tree / "llm" / "tokenizer.json").write_text("{}")
    msg = only(check(tree), "error")
    assert "model files differ (--model_name_or_path: model.safetensors changed; tokenizer.json added)" in msg
    assert "--overwrite_output_dir True" in msg


def test_settings_of_an_older_version_without_model_files_still_resume(tree):
    start_run(tree)
    path = tree / "out" / pf.RUN_SETTINGS_FILE
    saved = json.loads(path.read_text())
    del saved["compared"]["model_files"]
    path.write_text(json.dumps(saved))
    (tree / "llm" / "config.json").write_text('{"hidden_size": 8}')
    assert check(tree) == []


def test_large_model_files_are_identified_by_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(pf, "FULL_HASH_LIMIT", 64)
    monkeypatch.setattr(pf, "SAMPLE_BYTES", 8)
    p = tmp_path / "w.bin"
    data = bytearray(range(200))
    p.write_bytes(bytes(data))
    first = pf.content_digest(str(p))
    assert first.startswith("sampled:")
    data[100] ^= 1  # inside the middle sample
    p.write_bytes(bytes(data))
    assert pf.content_digest(str(p)) != first
    data[100] ^= 1
    data[50] ^= 1  # between the samples: not seen (the price of not reading 26 GB)
    p.write_bytes(bytes(data))
    assert pf.content_digest(str(p)) == first
    p.write_bytes(bytes(data) + b"x")  # a size change is always seen
    assert pf.content_digest(str(p)) != first


def test_fingerprint_cache_by_size_and_mtime(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("[1, 2]")
    fresh = pf.file_fingerprint(str(p))
    assert fresh["sha256"] == hashlib.sha256(b"[1, 2]").hexdigest()
    cached = dict(fresh, sha256="from-cache")
    assert pf.file_fingerprint(str(p), cached)["sha256"] == "from-cache"  # size and mtime match: no re-hash
    os.utime(p, ns=(fresh["mtime_ns"] + 10**9, fresh["mtime_ns"] + 10**9))
    assert pf.file_fingerprint(str(p), cached)["sha256"] == fresh["sha256"]


def test_overwrite_output_dir_starts_over(tree):
    start_run(tree)
    (tree / "out" / "checkpoint-4").mkdir()
    (tree / "out" / "tmp-checkpoint-6").mkdir()
    msg = only(check(tree, "--contrastive_weight", "2.0", "--overwrite_output_dir", "True"), "warning")
    assert "checkpoint-2, checkpoint-4" in msg and "starts from step 0" in msg
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tree)
        pf.run_preflight(argv(tree, "--contrastive_weight", "2.0", "--overwrite_output_dir", "True"), "llava",
                         stream=io.StringIO())
    assert sorted(os.listdir(tree / "out")) == [pf.RUN_SETTINGS_FILE]
    assert json.loads((tree / "out" / pf.RUN_SETTINGS_FILE).read_text())["compared"]["contrastive_weight"] == 2.0


def test_checkpoints_without_settings_file(tree):
    ckpt = tree / "out" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    assert "no run_settings.json" in only(check(tree), "warning")
    # an older version's checkpoint: its contrastive_config.json is compared
    cfg = ContrastiveArguments(contrastive_weight=2.0).to_dict()
    (ckpt / "contrastive_config.json").write_text(json.dumps(cfg))
    assert "--contrastive_weight 2.0 -> 0.5" in only(check(tree), "error")


def test_finished_run_without_checkpoints_is_overwritten_with_a_warning(tree):
    (tree / "out").mkdir()
    (tree / "out" / "mm_projector.bin").write_bytes(b"x")
    assert "trained again from step 0" in only(check(tree), "warning")


def test_resume_from_checkpoint_flag(tree):
    assert "not read by upstream's train()" in only(check(tree, "--resume_from_checkpoint", "x"), "warning")
    base = ["--llm_dir", str(tree / "llm"), "--vision_dir", str(tree / "tower"), "--data_path", str(tree / "data.json"),
            "--image_folder", str(tree / "images"), "--output_dir", str(tree / "out")]
    msg = only(pf.check_command(base + ["--resume_from_checkpoint", str(tree / "nope")], "hf", env={}), "error")
    assert "no such checkpoint directory" in msg


def test_differences_compares_numbers_by_value():
    assert pf.differences({"a": 1, "b": "x", "c": 2}, {"a": 1.0, "b": "y", "new": 3}) == [("b", "x", "y")]


# ---- reporting ---------------------------------------------------------------------------------------
def test_exit_on_errors():
    stream = io.StringIO()
    pf.exit_on_errors([pf.warning("w1")], stream)  # warnings only: returns
    assert "warning: w1" in stream.getvalue()
    stream = io.StringIO()
    with pytest.raises(SystemExit) as exc:
        pf.exit_on_errors([pf.warning("w1"), pf.error("e1")], stream)
    assert exc.value.code == 2
    assert "1 error(s), 1 warning(s); nothing was loaded" in stream.getvalue() and "error: e1" in stream.getvalue()


def test_errors_are_listed_first(tree):
    problems = check(tree, "--contrastive_prompt", "e5v", "--data_path", str(tree / "nope.json"))
    assert [p.severity for p in problems] == ["error", "warning"]


def test_strip_flag():
    assert pf.strip_flag(["--a", "1", "--overwrite_output_dir", "True", "--b"], "overwrite_output_dir") == \
        ["--a", "1", "--b"]
    assert pf.strip_flag(["--overwrite_output_dir", "--b", "2"], "overwrite_output_dir") == ["--b", "2"]
    assert pf.strip_flag(["--overwrite_output_dir=true"], "overwrite_output_dir") == []


def test_not_compared_and_compared_are_disjoint():
    for host in pf.HOSTS:
        assert not set(pf.COMPARED[host]) & set(pf.NOT_COMPARED)
    assert all(reason for reason in pf.NOT_COMPARED.values())


@pytest.mark.parametrize("model_type", ["siglip_vision_model", "siglip"])
def test_upstream_host_refuses_a_siglip_tower_naming_the_native_host(tree, model_type):
    (tree / "tower" / "config.json").write_text(json.dumps({"model_type": model_type}))
    message = only(check(tree), "error")
    assert f"a {model_type!r} tower" in message and "CLIPVisionTower loads only CLIP" in message
    assert "--host hf" in message and f"--vision_dir {tree / 'tower'}" in message
    (tree / "tower" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    assert check(tree) == []
