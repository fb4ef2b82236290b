"""Built-in models; importing this package registers them."""

from zoo.models import cvae, edit_cvae, iwae, tcvae, vae

__all__ = ["cvae", "edit_cvae", "iwae", "tcvae", "vae"]
