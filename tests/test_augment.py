import torch

from zoo.augment import random_blur, random_shift


def test_random_shift_translates_within_its_bound():
    image = torch.zeros(64, 1, 16, 16)
    image[:, :, 8, 8] = 1.0
    torch.manual_seed(0)
    assert torch.allclose(random_shift(image, 0.0), image, atol=1e-6)
    shifted = random_shift(image, 1 / 8)  # up to 2 px each way
    rows = torch.arange(16.0).view(1, 1, 16, 1)
    centre = (shifted * rows).sum(dim=(1, 2, 3)) / shifted.sum(dim=(1, 2, 3))
    assert (centre - 8).abs().max() <= 2 + 1e-4 and (centre - 8).abs().max() > 0.5


def test_random_blur_removes_a_pixel_grid_texture_and_keeps_a_feature():
    """At its strongest the blur erases a period-2 checkerboard and keeps an 8 px square;
    each image draws its own strength, from none to ``max_sigma``."""
    torch.manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checker = ((rows + cols) % 2).float().expand(256, 3, 32, 32)
    square = torch.zeros(256, 3, 32, 32)
    square[:, :, 12:20, 12:20] = 1.0
    blurred_checker = random_blur(checker, 1.0)
    contrast = blurred_checker.amax(dim=(1, 2, 3)) - blurred_checker.amin(dim=(1, 2, 3))
    assert contrast.min() < 0.02  # the strongest draws leave < 2 % of the texture
    assert contrast.max() > 0.9  # the weakest leave it almost whole
    assert torch.allclose(blurred_checker.mean(dim=(1, 2, 3)), torch.full((256,), 0.5), atol=0.01)
    blurred_square = random_blur(square, 1.0)
    assert blurred_square[:, :, 15, 15].min() > 0.95  # the square's centre survives
    assert torch.allclose(blurred_square.sum(dim=(2, 3)), square.sum(dim=(2, 3)), rtol=1e-3)


def test_random_blur_passes_gradients_to_its_input():
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    random_blur(x, 1.0).sum().backward()
    # every output is a weighted mean of inputs, so the input gradients add up to the outputs
    assert x.grad is not None and (x.grad > 0).all()
    assert abs(x.grad.sum().item() - x.numel()) < 1e-2
