"""LoRAs merged into the DiT weights at load (`formats`: key maps; `files`: reading and
checking; `merge`: the float32 merge)."""

from wanrt.lora.files import LoraError, LoraFile
from wanrt.lora.formats import LoraFormat
from wanrt.lora.merge import LoadedLora, LoraExpert, LoraSpec, check_loras, merge_loras, parameter_shapes

__all__ = ["LoadedLora", "LoraError", "LoraExpert", "LoraFile", "LoraFormat", "LoraSpec", "check_loras",
           "merge_loras", "parameter_shapes"]
