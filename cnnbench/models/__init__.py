"""One registry of architectures, in the manner of torchvision's `models/_api.py`.

Every model takes `(N, C, H, W)` float images and returns logits `(N, num_classes)`,
the same type in train and eval mode. Builders take keyword-only arguments:
`in_channels`, `num_classes`, `image_size`, `activation` and `dropout` (None keeps the
model's own choice). A builder declares which of `activation`/`dropout` it honours, so
a spec asking a model for a setting it lacks is refused when the spec is loaded.
The user's own networks (an import path, or `register_user_model`) are models too: user.py.
"""

# importing the architecture files registers their builders
from cnnbench.models import alexnet, inception, lenet, resnet, tv  # noqa: E402,F401
from cnnbench.models.layers import ACTIVATIONS
from cnnbench.models.registry import ModelEntry, get_model, list_models, model_entry, register_model
from cnnbench.models.source import is_import_path
from cnnbench.models.user import model_identity, register_user_model

__all__ = ["ACTIVATIONS", "ModelEntry", "get_model", "is_import_path", "list_models", "model_entry",
           "model_identity", "register_model", "register_user_model"]
