"""Built-in models; importing this package registers them."""

from zoo.models import cvae, iwae, tcvae, vae

__all__ = ["cvae", "iwae", "tcvae", "vae"]
