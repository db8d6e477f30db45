"""Upper bounds on what wanrt accepts from users, in one place.

A tiny file can describe an enormous input (a 222 KB mp4 of 3000 black 1024x1024 frames
decodes to 9 GB of pixels, a 420 KB PNG to 144 megapixels), so every input reader checks
these before decoding (from the container's or the image's header) and again while
decoding. They are far above what any Wan2.2 task generates; the README's "Reliability"
section lists them.
"""

from __future__ import annotations

# Frames of a generated video (`--frame-num`) and of a decoded source video: 20 s at
# 24 fps, 4n+1. The released tasks make 81 or 121.
MAX_FRAMES = 481
# Pixels of one video frame: 4K UHD. Wan2.2 generates at most 1280x720.
MAX_VIDEO_FRAME_PIXELS = 3840 * 2160
# Pixels of all decoded frames together (frames x width x height): 121 frames of 1280x720
# with room to spare, about 2.4 GB as float32 RGB.
MAX_VIDEO_TOTAL_PIXELS = 200_000_000
# Duration of a source video, from its container, in seconds.
MAX_VIDEO_SECONDS = 120.0
# Pixels of a conditioning image (`--image`): an 8K photo (7680x4320 = 33 MP) fits.
MAX_IMAGE_PIXELS = 40_000_000
# Duration of a driving audio track (speech-to-video), in seconds.
MAX_AUDIO_SECONDS = 300.0
# Characters of a prompt: T5 reads 512 tokens, so anything longer is cut anyway.
MAX_PROMPT_CHARS = 20_000
