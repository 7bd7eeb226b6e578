"""Named errors: part of diffstudio's interface (ARCHITECTURE.md, principle 9).

Every message says what went wrong *and* what the user can do about it.
"""


class DiffstudioError(Exception):
    """Base class of every error diffstudio raises on purpose."""


class ModelNotFoundError(DiffstudioError, FileNotFoundError):
    """A path does not exist, or a folder holds no model file diffstudio can read."""


class InputFileNotFoundError(DiffstudioError, FileNotFoundError):
    """An input that is not there: a video, a folder of frames, a keyframe folder. The message names
    which input it was."""


class UnsupportedFormatError(DiffstudioError, ValueError):
    """A file whose format diffstudio does not read (by extension and magic bytes)."""


class CorruptFileError(DiffstudioError, ValueError):
    """A file that claims a known format but is empty, truncated or malformed."""


class UnsafeCheckpointError(DiffstudioError):
    """A pickle-based checkpoint that would execute code or build non-tensor objects.

    diffstudio only unpickles with ``torch.load(weights_only=True)``; nothing in a
    refused file is ever run.
    """


class UnknownModelError(DiffstudioError, ValueError):
    """A state dict that matches no family/component record. Never guessed."""


class ConversionError(DiffstudioError, ValueError):
    """A layout conversion left keys unconsumed, missed keys or changed shapes."""


class MotionModuleMismatchError(DiffstudioError, ValueError):
    """An AnimateDiff motion module that does not fit the UNet it is added to (made for another
    family, e.g. an SDXL module on SD 1.x), or a file that is not a motion module."""


class InvalidSizeError(DiffstudioError, ValueError):
    """An image size (or frame count) the model cannot take."""


class NaNError(DiffstudioError, FloatingPointError):
    """A model produced NaN or inf values (often fp16 overflow: try bf16 or fp32)."""


class InvalidInputError(DiffstudioError, ValueError):
    """Arguments that cannot go together or are out of range (e.g. a mask without an init image)."""


class EmbeddingMismatchError(DiffstudioError, ValueError):
    """A textual-inversion embedding whose vector width does not fit the text encoder (made for another family)."""


class LoRANotFoundError(ModelNotFoundError):
    """A prompt's ``<lora:name>`` tag whose name matches no file in the LoRA folders searched."""


class LoRAUnavailableError(DiffstudioError, RuntimeError):
    """A prompt names a LoRA (``<lora:name:w>``) but the loaded model cannot apply LoRAs."""


class RegionError(InvalidInputError):
    """A region prompt or region layout file that cannot be used (a bad box, a missing mask file,
    an unknown key, a model without region attention)."""


class LoRAMismatchError(DiffstudioError, ValueError):
    """A LoRA (or LyCORIS) file whose layers match none of the model's weights, or do not fit them.

    Usually the file was made for another family (an SDXL LoRA on SD 1.x); `diffstudio lora inspect
    FILE --model BASE` says which family it targets and which of its layers matched.
    """


class MissingExtraError(DiffstudioError, ImportError):
    """A feature needs an optional package that is not installed (e.g. training needs the ``train`` extra:
    ``pip install "diffstudio[train]"``); the message names what to install."""


class StaleRunError(InvalidInputError):
    """A training run asked to resume from a work folder whose checkpoint was made with another recipe
    (other data, base model or settings). The message lists the fields that differ and the ways on:
    ``--restart`` (start over in that folder) or another ``--workdir``."""


class ControlNetMismatchError(DiffstudioError, ValueError):
    """A ControlNet that does not fit the loaded base model (made for another family, or another UNet's widths)."""


class IPAdapterMismatchError(DiffstudioError, ValueError):
    """An IP-Adapter that does not fit the loaded model (its cross-attention count or widths), or an image
    encoder whose features are not the ones the adapter reads."""


class FrameCountError(InvalidInputError):
    """A frame count a video model cannot take (CogVideoX: 4k + 1 frames, one latent frame per four video
    frames after the first)."""


class MemoryPlanError(DiffstudioError, MemoryError):
    """A model that cannot run in the memory given, whatever the plan (dtype, fp8 storage, offload, VAE tiling);
    raised before anything loads. The message names the smallest plan tried, what it needs on the device and
    on the host, and the shortfall (docs/memory.md)."""


class AnnotatorWeightsNotFoundError(ModelNotFoundError):
    """A learned annotator (HED, line art) whose weight file is not in the annotator folder, or no folder was
    given. The message names the file to fetch, the repository it comes from (lllyasviel/Annotators) and where
    it was looked for (``weights_dir=``, ``--annotators``, ``DIFFSTUDIO_ANNOTATORS``)."""
