"""Prompt extension: a tiny random Qwen2 through transformers (config, random weights and a
tokenizer written by the test) and the DashScope SDK against a fake DashScope server on
127.0.0.1 that speaks the API's request/response shape.

A tiny Qwen2.5-VL is not built here: transformers' Qwen2.5-VL processor cannot be constructed
without torchvision (its video-processor class check fails), and no torchvision build for this
CPU torch is installable here. The image path is exercised through DashScope's multimodal API.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from dataclasses import replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from wanrt import prompt_extend
from wanrt.cli.app import app
from wanrt.generate import read_latents
from wanrt.prompt_extend import (SYSTEM_PROMPTS, PromptExtendError, PromptExtendMethod, PromptExtendOptions,
                                 PromptExtensionCache, PromptKind, TargetLanguage, extend_prompt, image_to_pil)
from wanrt.video_io import load_image

API_KEY = "sk-test"
CPU = torch.device("cpu")
# How long the fake server lives at most, should a test never stop it.
SERVER_LIFETIME_S = 120
WORDS = ("a cat dog on the beach sunny walks runs jumps camera pans slowly golden light wide shot "
         "waves sand city street red blue").split()
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")


def test_system_prompts_per_kind_and_language_state_language_and_length():
    """The official prompts' fixed rules: output language, word budget, prompt-only output."""
    limits = {PromptKind.TEXT: ("60 to 200 words", "60到200字"), PromptKind.IMAGE: ("100 words", "100字"),
              PromptKind.FROM_IMAGE: ("100 words", "100字")}
    for kind, (english_limit, chinese_limit) in limits.items():
        english, chinese = SYSTEM_PROMPTS[kind, TargetLanguage.EN], SYSTEM_PROMPTS[kind, TargetLanguage.ZH]
        assert "in English only" in english and english_limit in english and "alone" in english
        assert "输出中文" in chinese and chinese_limit in chinese and "只输出" in chinese
    assert prompt_extend.prompt_kind("a cat", has_image=False) is PromptKind.TEXT
    assert prompt_extend.prompt_kind("she waves", has_image=True) is PromptKind.IMAGE
    assert prompt_extend.prompt_kind("  ", has_image=True) is PromptKind.FROM_IMAGE


# ---------------------------------------------------------------------- tiny Qwen2


def write_tiny_qwen(folder: Path) -> Path:
    """A Qwen2ForCausalLM with random weights and a word-level tokenizer with a ChatML
    template, saved as a Hugging Face model folder; sampling enabled as in Qwen2.5-Instruct."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {token: index for index, token in enumerate(["[UNK]", *SPECIAL_TOKENS, *("▁" + w for w in WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"],
                         bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    # Random weights put the end token's probability near 1/vocab: bound the answer's length.
    model.generation_config.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, max_length=None)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return write_tiny_qwen(tmp_path_factory.mktemp("qwen") / "tiny-qwen2")


@pytest.fixture(autouse=True)
def _short_answers(monkeypatch):
    monkeypatch.setattr(prompt_extend, "MAX_NEW_TOKENS", 24)
    monkeypatch.setattr(prompt_extend, "RETRY_WAITS_S", (0.0, 0.0, 0.0))


def local_options(model: Path | str, **changes) -> PromptExtendOptions:
    return replace(PromptExtendOptions(PromptExtendMethod.LOCAL_QWEN, str(model), TargetLanguage.EN), **changes)


def reference_generation(folder: Path, prompt: str, seed: int) -> str:
    """What transformers itself answers for the English text-to-video system prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    messages = [{"role": "system", "content": SYSTEM_PROMPTS[PromptKind.TEXT, TargetLanguage.EN]},
                {"role": "user", "content": prompt}]
    inputs = tokenizer([tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)],
                       return_tensors="pt")
    torch.manual_seed(seed)
    output = model.generate(**inputs, max_new_tokens=24)
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def test_local_qwen_extends_as_transformers_does_and_is_seeded(tiny_qwen):
    extend = lambda seed: extend_prompt("a cat on the beach", None, local_options(tiny_qwen), seed=seed,
                                        device=CPU, cache=None)
    expected_draw = torch.rand(1, generator=torch.Generator().manual_seed(123))
    torch.manual_seed(123)
    first = extend(5)
    assert torch.equal(torch.rand(1), expected_draw), "extension must leave the caller's RNG as it was"
    again, other = extend(5), extend(6)
    assert first.extended and first.error is None and first.prompt
    assert first.prompt == again.prompt != other.prompt
    assert first.prompt == reference_generation(tiny_qwen, "a cat on the beach", seed=5)
    assert (first.kind, first.seed, first.cache, first.original) == (PromptKind.TEXT, 5, "off", "a cat on the beach")


def test_local_model_from_the_hugging_face_cache_and_a_missing_one(tiny_qwen, tmp_path, monkeypatch):
    """An id resolves through the hub cache's layout (refs/main -> snapshots/<commit>) with no
    network; an id not cached, or the official short name of one, is a one-line failure."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--qwen2-chat"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tiny_qwen.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    cached = extend_prompt("a dog", None, local_options("tiny/qwen2-chat"), seed=1, device=CPU, cache=None)
    from_folder = extend_prompt("a dog", None, local_options(tiny_qwen), seed=1, device=CPU, cache=None)
    assert cached.extended and cached.prompt == from_folder.prompt
    for name, repo_id in (("QwenVL2.5_7B", "Qwen/Qwen2.5-VL-7B-Instruct"), ("tiny/absent", "tiny/absent")):
        missing = extend_prompt("a dog", None, local_options(name), seed=1, device=CPU, cache=None)
        assert not missing.extended and missing.prompt == "a dog"
        assert repo_id in missing.error and "Hugging Face cache" in missing.error and "\n" not in missing.error
        with pytest.raises(PromptExtendError, match="--prompt-extend-strict"):
            extend_prompt("a dog", None, local_options(name, strict=True), seed=1, device=CPU, cache=None)


def test_an_image_needs_a_vision_language_model(tiny_qwen):
    failed = extend_prompt("", torch.zeros(3, 8, 8), local_options(tiny_qwen), seed=1, device=CPU, cache=None)
    assert failed.kind is PromptKind.FROM_IMAGE and failed.prompt == ""
    assert "is a qwen2 model" in failed.error and "Qwen2.5-VL" in failed.error


# ---------------------------------------------------------------------- fake DashScope


class FakeDashScope:
    """DashScope's generation endpoints on 127.0.0.1: records each request and answers as the
    service does, or with the next queued (HTTP status, JSON body)."""

    TEXT_PATH = "/api/v1/services/aigc/text-generation/generation"
    MULTIMODAL_PATH = "/api/v1/services/aigc/multimodal-generation/generation"

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.queued: list[tuple[int, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "authorization": self.headers["Authorization"], **body})
                status, answer = fake.answer(self.path, body)
                data = json.dumps(answer, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self._deadline = threading.Timer(SERVER_LIFETIME_S, self.stop)
        self._deadline.daemon = True
        self._deadline.start()

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        if self.queued:
            return self.queued.pop(0)
        user = body["input"]["messages"][1]["content"]
        if path == self.MULTIMODAL_PATH:
            text = next(part["text"] for part in user if "text" in part)
            content = [{"text": f"Extended from the image: {text or 'the scene comes alive'}."}]
        else:
            content = f"Cinematic, daytime, wide shot. {user}, in detail."
        return HTTPStatus.OK, {"request_id": "fake", "output": {"choices": [{"finish_reason": "stop", "message": {
            "role": "assistant", "content": content}}]}, "usage": {"input_tokens": 10, "output_tokens": 10}}

    def stop(self) -> None:
        self._deadline.cancel()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dashscope_server(monkeypatch):
    pytest.importorskip("dashscope")
    fake = FakeDashScope()
    monkeypatch.setenv("DASH_API_KEY", API_KEY)
    monkeypatch.setenv("DASH_API_URL", fake.url)
    yield fake
    fake.stop()


def service_error(status: int, code: str, message: str) -> tuple[int, dict]:
    """An error as DashScope answers it."""
    return status, {"request_id": "fake", "code": code, "message": message}


DASHSCOPE = PromptExtendOptions(PromptExtendMethod.DASHSCOPE, target_lang=TargetLanguage.EN)


def decoded_image(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):]))).convert("RGB")


def test_dashscope_text_request_and_answer(dashscope_server):
    extension = extend_prompt("a cat on the beach", None, DASHSCOPE, seed=2**40 + 9, device=None, cache=None)
    assert extension.prompt == "Cinematic, daytime, wide shot. a cat on the beach, in detail."
    assert (extension.model, extension.kind, extension.seed) == ("qwen-plus", PromptKind.TEXT, 2**40 + 9)
    (request,) = dashscope_server.requests
    assert request["path"] == FakeDashScope.TEXT_PATH and request["authorization"] == f"Bearer {API_KEY}"
    assert request["model"] == "qwen-plus"
    assert request["parameters"] == {"seed": 9, "result_format": "message"}  # within the API's 31-bit range
    assert request["input"]["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPTS[PromptKind.TEXT, TargetLanguage.EN]},
        {"role": "user", "content": "a cat on the beach"}]


def write_random_image(path: Path, width: int = 60, height: int = 40) -> Path:
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    Image.fromarray(pixels.numpy()).save(path)
    return path


def test_i2v_with_an_empty_prompt_uses_the_vision_language_path(dashscope_server, tmp_path):
    path = write_random_image(tmp_path / "first_frame.png")
    pixels = load_image(path)
    options = replace(DASHSCOPE, target_lang=TargetLanguage.ZH)
    extension = extend_prompt("", pixels, options, seed=4, device=None, cache=None)
    assert extension.prompt == "Extended from the image: the scene comes alive."
    assert (extension.model, extension.kind) == ("qwen-vl-max", PromptKind.FROM_IMAGE)
    (request,) = dashscope_server.requests
    assert request["path"] == FakeDashScope.MULTIMODAL_PATH and request["model"] == "qwen-vl-max"
    system, user = request["input"]["messages"]
    assert system == {"role": "system", "content": [{"text": SYSTEM_PROMPTS[PromptKind.FROM_IMAGE, TargetLanguage.ZH]}]}
    assert user["content"][0] == {"text": ""}
    # The image travels inline and arrives with exactly the pixels the run conditions on.
    with Image.open(path) as original:
        assert decoded_image(user["content"][1]["image"]).tobytes() == original.tobytes()
    with_prompt = extend_prompt("she waves", pixels, options, seed=4, device=None, cache=None)
    assert with_prompt.kind is PromptKind.IMAGE
    assert dashscope_server.requests[1]["input"]["messages"][0]["content"][0]["text"] == \
        SYSTEM_PROMPTS[PromptKind.IMAGE, TargetLanguage.ZH]


def test_large_images_are_sent_within_the_official_pixel_budget(dashscope_server):
    extend_prompt("x", torch.zeros(3, 720, 1280), DASHSCOPE, seed=0, device=None, cache=None)
    sent = decoded_image(dashscope_server.requests[0]["input"]["messages"][1]["content"][1]["image"])
    assert sent.width * sent.height <= 512 * 512 * 1.01 and abs(sent.width / sent.height - 1280 / 720) < 0.01


def test_throttling_is_retried_and_a_refused_key_is_not(dashscope_server):
    dashscope_server.queued = [service_error(429, "Throttling.RateQuota", "Requests rate limit exceeded")]
    assert extend_prompt("a dog", None, DASHSCOPE, seed=1, device=None, cache=None).extended
    assert len(dashscope_server.requests) == 2
    dashscope_server.queued = [service_error(401, "InvalidApiKey", "Invalid API-key provided.")] * 4
    failed = extend_prompt("a dog", None, DASHSCOPE, seed=1, device=None, cache=None)
    assert len(dashscope_server.requests) == 3
    assert failed.prompt == "a dog" and "401 InvalidApiKey" in failed.error
    dashscope_server.queued = [(HTTPStatus.OK, {"request_id": "fake", "output": {"choices": []}})]
    malformed = extend_prompt("a dog", None, DASHSCOPE, seed=1, device=None, cache=None)
    assert malformed.prompt == "a dog" and "no message text" in malformed.error
    assert len(dashscope_server.requests) == 4


def test_unreachable_service_falls_back_or_stops_when_strict(monkeypatch):
    pytest.importorskip("dashscope")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("DASH_API_KEY", API_KEY)
    monkeypatch.setenv("DASH_API_URL", f"http://127.0.0.1:{port}/api/v1")
    failed = extend_prompt("a dog", None, DASHSCOPE, seed=1, device=None, cache=None)
    assert not failed.extended and failed.prompt == "a dog" and "ConnectionError" in failed.error
    assert failed.record()["extended_prompt"] is None and failed.record()["used_prompt"] == "a dog"
    with pytest.raises(PromptExtendError, match="prompt extension failed"):
        extend_prompt("a dog", None, replace(DASHSCOPE, strict=True), seed=1, device=None, cache=None)


def test_cache_hits_by_method_model_prompt_image_and_language(dashscope_server, tmp_path):
    cache = PromptExtensionCache(tmp_path / "extensions")
    image = torch.zeros(3, 8, 8)
    first = extend_prompt("a dog", image, DASHSCOPE, seed=1, device=None, cache=cache)
    hit = extend_prompt("a dog", image, DASHSCOPE, seed=99, device=None, cache=cache)
    assert (first.cache, hit.cache) == ("miss", "hit") and hit.prompt == first.prompt
    assert hit.seed == 1 and len(dashscope_server.requests) == 1  # the cached answer's seed
    for prompt, other_image, options in (("a cat", image, DASHSCOPE), ("a dog", image + 1, DASHSCOPE),
                                         ("a dog", image, replace(DASHSCOPE, target_lang=TargetLanguage.ZH)),
                                         ("a dog", image, replace(DASHSCOPE, model="qwen-vl-plus"))):
        assert extend_prompt(prompt, other_image, options, seed=1, device=None, cache=cache).cache == "miss"
    assert len(dashscope_server.requests) == 5
    dashscope_server.queued = [service_error(400, "InvalidParameter", "bad")]
    assert extend_prompt("a horse", None, DASHSCOPE, seed=1, device=None, cache=cache).error  # failures are not cached
    assert extend_prompt("a horse", None, DASHSCOPE, seed=1, device=None, cache=cache).cache == "miss"


def test_missing_api_key_is_refused_up_front(monkeypatch):
    pytest.importorskip("dashscope")
    monkeypatch.delenv("DASH_API_KEY", raising=False)
    with pytest.raises(prompt_extend.InputError, match="DASH_API_KEY"):
        DASHSCOPE.check()


# ---------------------------------------------------------------------- wanrt generate


def generate(*args: object):
    return CliRunner().invoke(app, ["generate", *(str(arg) for arg in args)])


def test_generate_uses_prints_and_records_the_extended_prompt(checkpoints, tiny_qwen, tmp_path, cache_dir):
    """The official flags: the extended prompt is the one encoded, both are printed and recorded."""
    result = generate("--task", "tiny-t2v", "--ckpt_dir", checkpoints["tiny-t2v"], "--device", "cpu",
                      "--prompt", "a dog on the beach", "--frame_num", 5, "--sample_steps", 2, "--base_seed", 7,
                      "--use_prompt_extend", "--prompt_extend_method", "local_qwen", "--prompt_extend_model",
                      tiny_qwen, "--prompt_extend_target_lang", "en", "--save_file", tmp_path / "out.mp4")
    assert result.exit_code == 0, result.output
    expected = extend_prompt("a dog on the beach", None, local_options(tiny_qwen), seed=7, device=CPU, cache=None)
    assert f"prompt extension: local_qwen {tiny_qwen} (en, seed 7)" in result.stderr
    assert "original prompt: a dog on the beach" in result.stderr
    assert f"extended prompt: {expected.prompt}" in result.stderr
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["settings"]["prompt"] == expected.prompt
    record = sidecar["options"]["prompt_extend"]
    assert (record["original_prompt"], record["extended_prompt"], record["used_prompt"]) == (
        "a dog on the beach", expected.prompt, expected.prompt)
    assert (record["method"], record["model"], record["target_lang"], record["seed"], record["cache"]) == (
        "local_qwen", str(tiny_qwen), "en", 7, "miss")
    again = extend_prompt("a dog on the beach", None, local_options(tiny_qwen), seed=7, device=CPU,
                          cache=PromptExtensionCache())
    assert (again.cache, again.prompt) == ("hit", expected.prompt)


def test_generate_i2v_from_an_empty_prompt_and_the_image(checkpoints, dashscope_server, tmp_path, cache_dir):
    image = write_random_image(tmp_path / "first_frame.png", width=100, height=72)
    result = generate("--task", "tiny-i2v", "--ckpt-dir", checkpoints["tiny-i2v"], "--device", "cpu",
                      "--image", image, "--prompt", "", "--frame-num", 5, "--steps", 2, "--seed", 3,
                      "--use-prompt-extend", "--prompt-extend-method", "dashscope",
                      "--prompt-extend-target-lang", "en", "--output", tmp_path / "out.mp4")
    assert result.exit_code == 0, result.output
    (request,) = dashscope_server.requests
    assert request["path"] == FakeDashScope.MULTIMODAL_PATH and request["model"] == "qwen-vl-max"
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["settings"]["prompt"] == "Extended from the image: the scene comes alive."
    record = sidecar["options"]["prompt_extend"]
    assert (record["original_prompt"], record["system_prompt_kind"], record["model"]) == (
        "", "from_image", "qwen-vl-max")


def test_failed_extension_continues_with_one_line_or_stops_when_strict(checkpoints, tmp_path, cache_dir,
                                                                      monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("DASH_API_KEY", API_KEY)
    monkeypatch.setenv("DASH_API_URL", f"http://127.0.0.1:{port}/api/v1")
    common = ["--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--device", "cpu", "--prompt", "a dog",
              "--frame-num", 5, "--steps", 1, "--use-prompt-extend", "--prompt-extend-method", "dashscope"]
    strict = generate(*common, "--prompt-extend-strict", "--output", tmp_path / "strict.mp4")
    assert strict.exit_code == 2 and strict.stderr.count("\n") == 1, strict.output
    assert "prompt extension failed" in strict.stderr and "ConnectionError" in strict.stderr
    assert not list(tmp_path.glob("strict*"))
    lenient = generate(*common, "--output", tmp_path / "lenient.mp4")
    assert lenient.exit_code == 0, lenient.output
    assert "continuing with the original prompt" in lenient.stderr
    record = json.loads((tmp_path / "lenient.json").read_text())["options"]["prompt_extend"]
    assert record["used_prompt"] == "a dog" and record["extended_prompt"] is None and record["error"]


@pytest.mark.parametrize("extra,needle", [
    (["--prompt", ""], "--prompt"),  # an empty prompt needs an image to write it from
    (["--prompt-extend-method", "dashscope"], "DASH_API_KEY"),
    (["--prompt_extend_target_lang", "fr"], "--prompt_extend_target_lang"),
    # The checkpoint is checked before extension runs: one line, no extension failure before it.
    (["--ckpt-dir", "/nonexistent/checkpoint", "--prompt_extend_model", "/nonexistent/qwen"], "--ckpt-dir"),
])
def test_extension_options_are_refused_in_one_line(checkpoints, tmp_path, monkeypatch, extra, needle):
    monkeypatch.delenv("DASH_API_KEY", raising=False)
    result = generate("--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", "a dog",
                      "--use_prompt_extend", "--output", tmp_path / "out.mp4", *extra)
    assert result.exit_code == 2 and needle in result.stderr and result.stderr.count("\n") == 1, result.output
