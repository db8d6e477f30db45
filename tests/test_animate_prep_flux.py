"""FLUX.1-Kontext pose editing: the official prompts, and the edit through a tiny random
FluxKontextPipeline saved and loaded in diffusers layout."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from wanrt.animate_prep.flux_edit import GUIDANCE_SCALE, PoseEditor, editing_prompts
from wanrt.animate_prep.frames import letterbox
from wanrt.errors import InputError

T_POSE = "Change the person to a standard T-pose (facing forward with arms extended)."
ARMS_DOWN = ("Change the person to a standard pose with the face oriented forward and arms extending "
             "straight down by the sides.")
LEGS = " The person is standing. Feet and Hands are visible in the image."
HANDS = " Hands are visible in the image."
FACE = "Change the person to face forward."


def meta(width: int, height: int, points: dict[int, tuple[float, float, float]] | None = None) -> dict:
    """A pose dict with only the given body points set (normalized x, y, confidence)."""
    body = np.zeros((20, 3))
    for index, point in (points or {}).items():
        body[index] = point
    return {"width": width, "height": height, "keypoints_body": body,
            "keypoints_left_hand": np.zeros((21, 3)), "keypoints_right_hand": np.zeros((21, 3)),
            "keypoints_face": np.zeros((69, 3))}


# Expected (template, reference) prompts: the outputs of the official `get_editing_prompts`
# on the same inputs.
PROMPT_CASES = {
    "legs, landscape template, portrait reference": (
        [meta(640, 480, {10: (0.5, 0.9, 0.8)})], meta(480, 640), (T_POSE + LEGS, ARMS_DOWN + LEGS)),
    "arms then legs in later frames, portrait template, landscape reference": (
        [meta(480, 640, {3: (0.5, 0.5, 0.9)}), meta(480, 640, {13: (0.4, 0.95, 0.76)})], meta(640, 480),
        (ARMS_DOWN + LEGS, T_POSE + LEGS)),
    "arms only, landscape": ([meta(640, 480, {7: (0.2, 0.3, 0.75)})], meta(800, 600), (T_POSE + HANDS,) * 2),
    "arms only, portrait": ([meta(480, 640, {4: (0.2, 0.3, 0.9)})], meta(480, 640), (ARMS_DOWN + HANDS,) * 2),
    "low confidence": ([meta(640, 480, {3: (0.5, 0.5, 0.5), 9: (0.5, 0.5, 0.7)})], meta(640, 480), (FACE, FACE)),
    "off the image": ([meta(640, 480, {4: (1.2, 0.5, 0.9), 12: (0.5, 1.01, 0.9)})], meta(480, 640), (FACE, FACE)),
    # Official quirk: one point detected (all non-zero, low confidence) and another confident
    # one at x == 0 together count as seen.
    "detected and confident are different points": (
        [meta(480, 640, {3: (0.5, 0.5, 0.1), 6: (0.0, 0.5, 0.9)})], meta(480, 640), (ARMS_DOWN + HANDS,) * 2),
    "confident point at x == 0 alone": ([meta(480, 640, {6: (0.0, 0.5, 0.9)})], meta(480, 640), (FACE, FACE)),
    "negative coordinates count as inside": (
        [meta(640, 480, {9: (-0.3, 0.5, 0.9)})], meta(480, 640), (T_POSE + LEGS, ARMS_DOWN + LEGS)),
    # Official quirk: the template's size is the frame the scan stopped at.
    "size of the frame where arms and legs were both seen": (
        [meta(640, 480, {3: (0.5, 0.5, 0.9), 9: (0.5, 0.5, 0.9)}), meta(480, 640)], meta(480, 640),
        (T_POSE + LEGS, ARMS_DOWN + LEGS)),
    "size of the last frame when the scan ran to the end": (
        [meta(640, 480, {9: (0.5, 0.5, 0.9)}), meta(480, 640)], meta(480, 640), (ARMS_DOWN + LEGS,) * 2),
    "empty template": ([], meta(480, 640), (FACE, FACE)),
}


@pytest.mark.parametrize("case", PROMPT_CASES)
def test_editing_prompts_match_official(case):
    template_metas, reference_meta, expected = PROMPT_CASES[case]
    assert editing_prompts(template_metas, reference_meta) == expected


@pytest.fixture(scope="module")
def tiny_flux_folder(tmp_path_factory):
    """A random FluxKontextPipeline in diffusers layout, with offline tokenizers: a CLIP BPE
    over single letters and the demo's toy T5 tokenizer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from wanrt.demo import write_toy_tokenizer

    root = tmp_path_factory.mktemp("ckpt")
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in "abcdefghijklmnopqrstuvwxyz.,()-":
        clip_vocab[character] = len(clip_vocab)
        clip_vocab[character + "</w>"] = len(clip_vocab)
    clip_tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    t5_tokenizer = T5TokenizerFast.from_pretrained(write_toy_tokenizer(root / "toy_t5"))
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_vocab), hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=1, projection_dim=32,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    # Kontext always works at about one megapixel: five VAE blocks (16x down) keep that cheap.
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,) * 5,
                        down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5,
                        layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipeline = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                                   tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                                   transformer=transformer)
    folder = root / "FLUX.1-Kontext-dev"
    pipeline.save_pretrained(folder)
    return folder


def test_edit_is_the_diffusers_pipeline_then_letterbox(tiny_flux_folder):
    editor = PoseEditor.load(tiny_flux_folder, "cpu", dtype=torch.float32, cpu_offload=False)
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    edited = editor.edit(image, FACE, seed=3, num_inference_steps=2)
    assert edited.shape == image.shape and edited.dtype == np.uint8

    from PIL import Image

    direct = editor.pipeline(image=Image.fromarray(image), height=48, width=64, prompt=FACE,
                             guidance_scale=GUIDANCE_SCALE, num_inference_steps=2,
                             generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert direct.size != (64, 48)  # generated at Kontext's own size, then fitted back
    np.testing.assert_array_equal(edited, letterbox(np.asarray(direct), 48, 64))


def one_line_error(call) -> str:
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_folder_names_the_flag_and_the_download(tmp_path):
    message = one_line_error(lambda: PoseEditor.load(tmp_path / "FLUX.1-Kontext-dev", "cpu"))
    assert f"--ckpt_path {tmp_path}" in message and "FLUX.1-Kontext-dev" in message
    assert "black-forest-labs/FLUX.1-Kontext-dev" in message and "diffusers layout" in message


def test_incomplete_folder_names_the_missing_components(tmp_path):
    folder = tmp_path / "FLUX.1-Kontext-dev"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxKontextPipeline", "vae": ["diffusers", "AutoencoderKL"],
         "transformer": ["diffusers", "FluxTransformer2DModel"], "image_encoder": [None, None]}))
    message = one_line_error(lambda: PoseEditor.load(folder, "cpu"))
    assert "lacks transformer;" in message and "black-forest-labs/FLUX.1-Kontext-dev" in message


def test_missing_weights_are_an_input_error(tiny_flux_folder, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_flux_folder, tmp_path / "FLUX.1-Kontext-dev")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    message = one_line_error(lambda: PoseEditor.load(folder, "cpu", dtype=torch.float32))
    assert "cannot be loaded" in message and "black-forest-labs/FLUX.1-Kontext-dev" in message


def test_missing_diffusers_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "diffusers"
                        else find_spec(name, *args))
    message = one_line_error(lambda: PoseEditor.load(tmp_path, "cpu"))
    assert "pip install 'wanrt[flux]'" in message


class _TwoStepEditor(PoseEditor):
    """The real editor at 2 steps (28 on the tiny pipeline would only cost time)."""

    def edit(self, image, prompt):
        return super().edit(image, prompt, seed=0, num_inference_steps=2)


def test_use_flux_retargets_through_the_edited_poses(tiny_flux_folder, tmp_path):
    from test_animate_prep import AREA, pose_models, write_inputs

    from wanrt.animate_prep import prepare as prep
    from wanrt.animate_prep.frames import area_size
    from wanrt.video_io import read_video_uint8

    ckpt, (video, reference) = write_inputs(tmp_path)
    editor = _TwoStepEditor(PoseEditor.load(tiny_flux_folder, "cpu", dtype=torch.float32).pipeline)
    models = prep.PrepModels(pose_models(ckpt).pose, editor=editor)
    save = tmp_path / "out"
    prep.prepare(video, reference, save, lambda: models,
                 prep.PrepOptions(resolution_area=AREA, retarget=True, use_flux=True))
    size = area_size(90, 70, AREA[0] * AREA[1])
    # The edited images are kept as the official code keeps them, at the sizes they were drawn at.
    assert cv2.imread(str(save / "refer_edit.png")).shape[:2] == size
    assert cv2.imread(str(save / "tpl_edit.png")).shape[:2] == (120, 160)
    pose, _ = read_video_uint8(save / "src_pose.mp4")
    assert pose.shape[1:3] == size and pose.float().mean() > 1
