"""Built-in models; importing this package registers them."""

from zoo.models import cvae, vae

__all__ = ["cvae", "vae"]
