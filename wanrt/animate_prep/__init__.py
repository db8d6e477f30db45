"""``wanrt animate-prep``: the Animate-14B preprocessing of the official ``preprocess_data.py``.

Person detection and whole-body pose (ONNX models through onnxruntime), face crops, pose
rendering, pose retargeting, and for replacement the SAM2 person masks; the result is the
``src_root_path`` folder the Animate pipeline reads. Needs the ``animate-prep`` extra
(onnxruntime, OpenCV) and, for replacement, the ``sam2`` package.
"""
