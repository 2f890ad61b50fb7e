"""The demo: a tiny text-to-image model of scikit-learn's 8x8 digits (``digits``), its rewards
(``rewards``: digit alignment, mean ink) and ``flowrl quickstart`` (``quickstart``). Built from the
library like a user's own code would be; nothing in ``flowrl`` outside this package imports it,
except the registries that name it (``model.pretrained: digits``, the digit rewards)."""
