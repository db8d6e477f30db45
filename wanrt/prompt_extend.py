"""Prompt extension: a language model rewrites the user's prompt into the long, concrete kind
the Wan2.2 models were trained on, as the official `generate.py --use_prompt_extend` does.

Two back ends, as the official code has them:
- DashScope, Alibaba's hosted API, through its `dashscope` SDK: `qwen-plus` for text,
  `qwen-vl-max` when an image is given; the key and the endpoint come from `DASH_API_KEY`
  and `DASH_API_URL`.
- A local Qwen2.5 through transformers: an Instruct model for text, Qwen2.5-VL for an image.
  It is loaded from a folder or from the Hugging Face cache, never downloaded during a run.

Extension is help, not a requirement: when it fails (network, quota, a missing model) the run
goes on with the user's prompt and says why in one line, unless `strict` asks to stop.
Results are cached on disk by everything they depend on, so a repeated run neither loads a
14B model nor pays for an API call. `dashscope` and `transformers` are imported on first use
(`pip install 'wanrt[prompt]'`).
"""

from __future__ import annotations

import base64
import gc
import hashlib
import importlib.util
import io
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from PIL import Image
from torch import Tensor

from wanrt.errors import InputError, WanrtError
from wanrt.hashing import cache_root, tensor_sha256
from wanrt.loading.save import write_json

API_KEY_ENV = "DASH_API_KEY"
API_URL_ENV = "DASH_API_URL"
DEFAULT_API_URL = "https://dashscope.aliyuncs.com/api/v1"
# DashScope's documented seed range is 0 .. 2**31 - 1; wanrt seeds go up to sys.maxsize.
_API_SEED_MODULUS = 2**31
# Waits before the 2nd, 3rd and 4th attempt (the official client tries 4 times).
RETRY_WAITS_S = (1.0, 2.0, 4.0)
# The official client sends images of at most this many pixels to the VL model.
API_MAX_IMAGE_PIXELS = 512 * 512
# Qwen2.5-VL's processor resizes images into this pixel range (the official settings).
VL_MIN_PIXELS = 256 * 28 * 28
VL_MAX_PIXELS = 1280 * 28 * 28
MAX_NEW_TOKENS = 512
_VL_MODEL_TYPE = "qwen2_5_vl"  # config.json's model_type for Qwen2.5-VL
CACHE_FORMAT = "wanrt-prompt-extension/1"


class PromptExtendError(WanrtError):
    """Prompt extension failed; the run falls back to the user's prompt unless strict."""


class PromptExtendMethod(str, Enum):
    DASHSCOPE = "dashscope"
    LOCAL_QWEN = "local_qwen"


class TargetLanguage(str, Enum):
    ZH = "zh"
    EN = "en"


class PromptKind(str, Enum):
    """Which rewrite is asked for; each has its own system prompt."""

    TEXT = "text"              # text-to-video: add cinematography and detail
    IMAGE = "image"            # a prompt with its first frame: keep to the motion
    FROM_IMAGE = "from_image"  # an empty prompt with an image: write the motion from the image


def prompt_kind(prompt: str, has_image: bool) -> PromptKind:
    if not has_image:
        return PromptKind.TEXT
    return PromptKind.IMAGE if prompt.strip() else PromptKind.FROM_IMAGE


# The official system prompts' intent, in our own words: the same language, length and
# style rules per target language and kind of rewrite.
_TEXT_RULES_EN = """\
You are a film director. Rewrite the user's idea for a video into one detailed prompt for a
text-to-video model.
1. Keep the user's subjects and actions exactly. Never add a subject that is not there (no
   people in a landscape that has none).
2. Add up to four cinematic choices that suit the scene, chosen from: time of day (daytime
   unless the user says otherwise), light source (daylight, moonlight, lamps, firelight,
   overcast light) and where it comes from, soft or hard light, light direction (top, side,
   from below, rim light), warm, cool or mixed colors, shot size (medium or wide by default),
   camera angle (leave it out when the user already describes a camera move), composition
   (centered by default).
3. Describe the subjects' appearance, expression, number and pose, and give the background
   concrete details.
4. Say how each action unfolds step by step. If nothing moves, give the subject a natural
   motion and let the background move too (clouds drifting, leaves in the wind).
5. If the user names a style, keep it and put it first; otherwise add no style. For
   illustration, anime or other non-photographic styles, add no film terms.
6. A sky is a clear blue sky, never overexposed.
7. No comments on mood or atmosphere ("full of energy", "a solemn feeling").
8. If the request is sexual or shows nudity, write a tasteful prompt about something else
   instead, without refusing or commenting.
9. Write in English only, 60 to 200 words. Output the prompt alone, with no heading such as
   "Rewritten prompt:".
Example: Side lighting, medium shot, warm colors, daytime. A grey tabby cat with white paws
sits on a wooden windowsill, its tail swaying slowly as it follows a sparrow hopping outside.
Sunlight through the window falls across its fur; potted herbs line the sill behind it.
"""

_TEXT_RULES_ZH = """\
你是一名电影导演。请把用户对视频的设想改写成一段给文生视频模型的详细提示词。
1. 严格保留用户给出的主体和动作，不要添加原文没有的主体（例如风景描写里不要加人）。
2. 从以下电影设定中挑选最多四项适合画面的内容加入：时间（未说明时用白天）、光源（日光、月光、灯光、火光、阴天光）及其来源、柔光或硬光、光线方向（顶光、侧光、底光、边缘光）、暖色调/冷色调/混合色调、景别（默认中景或全景）、拍摄角度（用户已描述运镜时不要添加）、构图（默认中心构图）。
3. 补充主体的外貌、表情、数量和姿态，并为背景补充具体细节。
4. 逐步写清每个动作如何发生；如果原文没有动作，为主体加上自然的动作，背景也可以动起来（云朵飘动、树叶随风摇摆）。
5. 用户指定了风格就保留并放在最前面，否则不要添加风格；插画、动漫等非写实风格不要加电影术语。
6. 天空一律写成湛蓝的天空，避免过曝。
7. 不要写氛围、感受之类的文学性评论（如“充满活力”“气氛庄重”）。
8. 如果请求涉及色情或裸露，请改写成一段与之无关、画面优美的提示词，不要拒绝也不要提醒用户。
9. 输出中文，60到200字左右；只输出提示词本身，不要加“改写后的提示词：”之类的开头。
示例：侧光，中景，暖色调，白天。一只白爪子的灰色虎斑猫坐在木质窗台上，尾巴缓缓摆动，目光追随着窗外一只跳来跳去的麻雀。阳光透过窗户洒在它的毛上，身后的窗台上摆着几盆香草。
"""

_IMAGE_RULES_EN = """\
You rewrite prompts for an image-to-video model. The user gives the video's first frame as an
image and a description of the video, which may be long, short, a list or an instruction.
Rewrite it into a short description of what happens, tied to what the image shows:
- Keep the motion the user describes and the main subject's actions.
- Name the main subject as it appears in the image, simply; if the user gives only an action
  ("dancing"), say from the image who or what does it ("a girl is dancing").
- Shorten a long input to the essential sequence of motion; give a short one plausible motion
  that fits the image.
- Keep every camera move the user mentions (pans up, moves left, pushes in, pulls back).
- Describe what moves, not what is already visible and static in the image.
- Write in English only, whatever the input language, at most 100 words. Output the rewritten
  prompt alone.
Example: The camera pushes in slowly as the old fisherman pulls the net from the water, water
dripping from the mesh, then he turns and smiles at someone on the shore.
"""

_IMAGE_RULES_ZH = """\
你负责为图生视频模型改写提示词。用户给出视频首帧图像和一段视频描述，描述可能很长、很短、是列表或是指令。请结合图像内容，把它改写成一段简短的画面动态描述：
- 保留用户描述的运动和主体的动作。
- 按图像中的样子简洁地称呼主体；如果用户只给了动作（如“跳舞”），根据图像补出是谁在做（如“一个女孩在跳舞”）。
- 输入过长时提炼出关键的动作过程；输入过短时结合图像补充合理的运动。
- 保留用户提到的所有运镜（镜头上摇、左移、推近、拉远等）。
- 只写会动的内容，不要描述图像中已经可见的静态内容。
- 无论输入什么语言都输出中文，100字以内；只输出改写后的提示词。
示例：镜头缓缓推近，老渔夫把渔网从水里拉起，网眼不断滴水，随后他转身朝岸上的人笑了笑。
"""

_FROM_IMAGE_RULES_EN = """\
You write prompts for an image-to-video model from an image alone: the image is the video's
first frame. Imagine how the scene comes to life: which subject moves and how, what else in the
scene moves, and whether the camera moves.
- Describe the motion; say little about the static scene.
- Write in English only, at most 100 words. Output the prompt alone.
Example: The girl lifts her head from the book and looks out of the window, then turns a page
as the curtain beside her sways in the breeze.
"""

_FROM_IMAGE_RULES_ZH = """\
你根据一张图像为图生视频模型撰写提示词，图像就是视频的首帧。请合理想象画面如何动起来：哪个主体在动、怎样动，画面里还有什么在动，镜头是否运动。
- 重点描述动态内容，少写静态场景。
- 输出中文，100字以内；只输出提示词本身。
示例：女孩从书本上抬起头望向窗外，随后翻过一页，身旁的窗帘在微风中轻轻摆动。
"""

SYSTEM_PROMPTS: Mapping[tuple[PromptKind, TargetLanguage], str] = {
    (PromptKind.TEXT, TargetLanguage.EN): _TEXT_RULES_EN,
    (PromptKind.TEXT, TargetLanguage.ZH): _TEXT_RULES_ZH,
    (PromptKind.IMAGE, TargetLanguage.EN): _IMAGE_RULES_EN,
    (PromptKind.IMAGE, TargetLanguage.ZH): _IMAGE_RULES_ZH,
    (PromptKind.FROM_IMAGE, TargetLanguage.EN): _FROM_IMAGE_RULES_EN,
    (PromptKind.FROM_IMAGE, TargetLanguage.ZH): _FROM_IMAGE_RULES_ZH,
}

# (text model, vision-language model) when --prompt-extend-model is not given: the official defaults.
DEFAULT_MODELS: Mapping[PromptExtendMethod, tuple[str, str]] = {
    PromptExtendMethod.DASHSCOPE: ("qwen-plus", "qwen-vl-max"),
    PromptExtendMethod.LOCAL_QWEN: ("Qwen2.5_14B", "QwenVL2.5_7B"),
}
# The official short names for local models.
QWEN_MODEL_IDS: Mapping[str, str] = {
    "QwenVL2.5_3B": "Qwen/Qwen2.5-VL-3B-Instruct",
    "QwenVL2.5_7B": "Qwen/Qwen2.5-VL-7B-Instruct",
    "Qwen2.5_3B": "Qwen/Qwen2.5-3B-Instruct",
    "Qwen2.5_7B": "Qwen/Qwen2.5-7B-Instruct",
    "Qwen2.5_14B": "Qwen/Qwen2.5-14B-Instruct",
}
# The package each method imports, for the up-front check.
_REQUIRED_PACKAGES = {PromptExtendMethod.DASHSCOPE: "dashscope", PromptExtendMethod.LOCAL_QWEN: "transformers"}


@dataclass(frozen=True)
class PromptExtendOptions:
    """What `--use_prompt_extend` and its companion flags asked for (official defaults)."""

    method: PromptExtendMethod = PromptExtendMethod.LOCAL_QWEN
    model: str | None = None
    target_lang: TargetLanguage = TargetLanguage.ZH
    strict: bool = False

    def model_name(self, with_image: bool) -> str:
        """The model asked for, else the method's default for text or for an image."""
        return self.model or DEFAULT_MODELS[self.method][with_image]

    def check(self) -> None:
        """Refuse what cannot work at all, before anything loads: a missing package, or no
        API key (the official client stops there too)."""
        package = _REQUIRED_PACKAGES[self.method]
        if importlib.util.find_spec(package) is None:
            raise InputError(f"--prompt_extend_method {self.method.value} needs the `{package}` package; "
                             "install it with: pip install 'wanrt[prompt]'")
        if self.method is PromptExtendMethod.DASHSCOPE and not os.environ.get(API_KEY_ENV):
            raise InputError(f"--prompt_extend_method dashscope needs an API key in ${API_KEY_ENV} "
                             f"(and ${API_URL_ENV} for an endpoint other than {DEFAULT_API_URL})")


@dataclass(frozen=True)
class PromptExtension:
    """The outcome of one extension: the prompt to use and how it was obtained."""

    original: str
    prompt: str  # the extended prompt, or `original` when extension failed
    method: PromptExtendMethod
    model: str
    target_lang: TargetLanguage
    kind: PromptKind
    seed: int
    cache: str  # "hit", "miss" or "off"
    error: str | None = None  # why extension failed (then `prompt` is `original`)
    seconds: float = 0.0

    @property
    def extended(self) -> bool:
        return self.error is None

    def record(self) -> dict[str, Any]:
        """What the sidecar records."""
        return {"original_prompt": self.original, "extended_prompt": self.prompt if self.extended else None,
                "used_prompt": self.prompt, "method": self.method.value, "model": self.model,
                "target_lang": self.target_lang.value, "system_prompt_kind": self.kind.value, "seed": self.seed,
                "cache": self.cache, "error": self.error, "seconds": self.seconds}


# ---------------------------------------------------------------------- images


def image_to_pil(image: Tensor) -> Image.Image:
    """`[3, H, W]` in [-1, 1] (as `load_image` returns it) back to the 8-bit RGB image it was
    read from: rounding inverts `load_image`'s x / 255 * 2 - 1 exactly."""
    pixels = ((image.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def _api_image(image: Image.Image) -> str:
    """The image as DashScope takes it inline: a base64 PNG data URL, scaled down (aspect kept)
    to the official client's pixel budget. Inline, so no file is uploaded to storage first."""
    width, height = image.size
    area = min(width * height, API_MAX_IMAGE_PIXELS)
    scaled = image.resize((round(math.sqrt(area * width / height)), round(math.sqrt(area * height / width))))
    buffer = io.BytesIO()
    scaled.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------------- back ends


def _dashscope_text(response: Any, vision: bool) -> str:
    try:
        content = response.output.choices[0].message.content
        # The multimodal endpoint answers a list of parts, the text endpoint a string.
        text = "".join(part.get("text", "") for part in content) if vision else content
    except (AttributeError, IndexError, KeyError, TypeError):
        text = None
    if not isinstance(text, str):
        raise PromptExtendError("DashScope's answer holds no message text")
    return text


def extend_with_dashscope(model: str, system_prompt: str, prompt: str, image: Image.Image | None,
                          seed: int, device: torch.device) -> str:
    """One chat request to DashScope's text (or, with an image, multimodal) generation API,
    retried on network errors, throttling and server errors; a refused request or key is final."""
    import dashscope

    # The SDK reads its endpoint from this module attribute, as the official client sets it.
    dashscope.base_http_api_url = os.environ.get(API_URL_ENV) or DEFAULT_API_URL
    if image is None:
        call = dashscope.Generation.call
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
    else:
        call = dashscope.MultiModalConversation.call
        messages = [{"role": "system", "content": [{"text": system_prompt}]},
                    {"role": "user", "content": [{"text": prompt}, {"image": _api_image(image)}]}]
    for wait in (0.0, *RETRY_WAITS_S):
        time.sleep(wait)
        try:
            response = call(model, messages=messages, api_key=os.environ.get(API_KEY_ENV),
                            seed=seed % _API_SEED_MODULUS, result_format="message")
        # The SDK raises requests' errors for the network and its own for bad input; either way
        # the run goes on without extension, so every error becomes the one-line failure.
        except Exception as error:
            status, failure = None, f"DashScope at {dashscope.base_http_api_url} failed ({type(error).__name__})"
        else:
            if response.status_code == HTTPStatus.OK:
                return _dashscope_text(response, vision=image is not None)
            status = response.status_code
            failure = f"DashScope answered HTTP {status} {response.code}: {response.message}"
        if status is not None and status != HTTPStatus.TOO_MANY_REQUESTS and status < 500:
            break
    raise PromptExtendError(failure)


def local_model_folder(name: str) -> Path:
    """A folder, else a Hugging Face model id (or an official short name for one) that is
    already in the local cache. Never downloads: a run does not fetch 30 GB unannounced."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    repo_id = QWEN_MODEL_IDS.get(name, name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        raise PromptExtendError(f"--prompt_extend_model {name}: not a folder, and {repo_id} is not in the "
                                f"Hugging Face cache ({HF_HUB_CACHE}); download it first with "
                                f"`hf download {repo_id}` or pass the model's folder") from None


def _require_vision_language_model(folder: Path, name: str) -> None:
    """Refuse a text-only model for an image: loaded as Qwen2.5-VL, its vision tower would be
    initialised at random and the answer would be noise, not an error."""
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise PromptExtendError(f"--prompt_extend_model {name}: {folder / 'config.json'} is missing or "
                                "unreadable") from None
    if model_type != _VL_MODEL_TYPE:
        raise PromptExtendError(f"--prompt_extend_model {name} is a {model_type} model; with --image it must be "
                                f"a Qwen2.5-VL model (e.g. QwenVL2.5_7B)")


def _generate_seeded(model: Any, inputs: Mapping[str, Tensor], seed: int, device: torch.device) -> Tensor:
    """`model.generate` with the torch RNG seeded (Qwen's generation config samples), leaving
    the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    return output[:, inputs["input_ids"].shape[1]:]


def extend_with_local_qwen(model: str, system_prompt: str, prompt: str, image: Image.Image | None,
                           seed: int, device: torch.device) -> str:
    """Qwen2.5-Instruct (or Qwen2.5-VL with an image) loaded for this one prompt and released,
    so the DiT that loads next has the memory."""
    folder = local_model_folder(model)
    if image is not None:
        _require_vision_language_model(folder, model)
        if importlib.util.find_spec("torchvision") is None:
            raise PromptExtendError("the Qwen2.5-VL processor needs torchvision; install the build that "
                                    "matches your torch")
    import transformers

    try:
        if image is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
            language_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
            messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = tokenizer([text], return_tensors="pt")
            decoder = tokenizer
        else:
            processor = transformers.AutoProcessor.from_pretrained(folder, min_pixels=VL_MIN_PIXELS,
                                                                   max_pixels=VL_MAX_PIXELS)
            language_model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype="auto")
            messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]},
                        {"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": prompt}]}]
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = processor(text=[text], images=[image], padding=True, return_tensors="pt")
            decoder = processor
        language_model.to(device).eval()
        generated = _generate_seeded(language_model, inputs.to(device), seed, device)
        return decoder.batch_decode(generated, skip_special_tokens=True)[0]
    # A model that does not load or fit (damaged files, out of memory) is one of the failures
    # the run survives; say what it was in one line.
    except Exception as error:
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise PromptExtendError(f"local model {model}: {type(error).__name__}: {reason}") from error
    finally:
        language_model = None  # the one reference: free the weights before the DiT loads
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


Extender = Callable[[str, str, str, Image.Image | None, int, torch.device], str]
EXTENDERS: Mapping[PromptExtendMethod, Extender] = {
    PromptExtendMethod.DASHSCOPE: extend_with_dashscope,
    PromptExtendMethod.LOCAL_QWEN: extend_with_local_qwen,
}


# ---------------------------------------------------------------------- cache


class PromptExtensionCache:
    """Extended prompts on disk, one small JSON file each, keyed by everything the result
    depends on: method, model, system prompt, prompt, image pixels and target language."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else cache_root() / "prompt_extensions"

    def path(self, method: PromptExtendMethod, model: str, system_prompt: str, prompt: str,
             image_sha256: str | None, target_lang: TargetLanguage) -> Path:
        parts = (CACHE_FORMAT, method.value, model, system_prompt, prompt, image_sha256 or "", target_lang.value)
        return self.folder / f"{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()}.json"

    def get(self, path: Path) -> dict[str, Any] | None:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # absent, or damaged (then `put` overwrites it)
        return entry if entry.get("format") == CACHE_FORMAT and isinstance(entry.get("prompt"), str) else None

    def put(self, path: Path, prompt: str, seed: int) -> None:
        try:
            write_json(path, {"format": CACHE_FORMAT, "prompt": prompt, "seed": seed})
        except OSError:
            pass  # an unwritable cache only costs the next run another extension


# ---------------------------------------------------------------------- entry point


def extend_prompt(prompt: str, image: Tensor | None, options: PromptExtendOptions, *, seed: int,
                  device: torch.device | None, cache: PromptExtensionCache | None) -> PromptExtension:
    """The prompt a run should use. A negative seed draws one (recorded), as the official
    client does; a local model runs on `device` (default: CUDA if present, as the pipeline's).
    Raises `PromptExtendError` on failure only when `options.strict`."""
    started = time.perf_counter()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = prompt_kind(prompt, image is not None)
    model = options.model_name(with_image=image is not None)
    system_prompt = SYSTEM_PROMPTS[kind, options.target_lang]
    seed = secrets.randbelow(sys.maxsize + 1) if seed < 0 else seed

    def outcome(used: str, used_seed: int, cache_state: str, error: str | None = None) -> PromptExtension:
        return PromptExtension(prompt, used, options.method, model, options.target_lang, kind, used_seed,
                               cache_state, error, time.perf_counter() - started)
    entry_path = None
    if cache is not None:
        entry_path = cache.path(options.method, model, system_prompt, prompt,
                                tensor_sha256(image) if image is not None else None, options.target_lang)
        entry = cache.get(entry_path)
        if entry is not None:
            return outcome(entry["prompt"], entry.get("seed", seed), "hit")
    cache_state = "off" if cache is None else "miss"
    try:
        extended = EXTENDERS[options.method](model, system_prompt, prompt,
                                             image_to_pil(image) if image is not None else None, seed, device)
        extended = extended.strip()
        if not extended:
            raise PromptExtendError(f"{model} answered an empty prompt")
    except PromptExtendError as error:
        if options.strict:
            raise PromptExtendError(f"prompt extension failed ({error}); leave out --prompt-extend-strict "
                                    "to continue with the original prompt") from None
        return outcome(prompt, seed, cache_state, error=str(error))
    if entry_path is not None:
        cache.put(entry_path, extended, seed)
    return outcome(extended, seed, cache_state)
