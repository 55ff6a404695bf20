import numpy as np
import pytest
import torch

from vit import patchify, unpatchify


@pytest.mark.parametrize("h,w", [(32, 32), (16, 48)])
def test_patchify_unpatchify_is_identity_numpy_and_torch(h, w):
    images = np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    patches = patchify(images, 8)
    assert patches.shape == (2, (h // 8) * (w // 8), 8 * 8 * 3)
    assert patches.dtype == np.uint8
    np.testing.assert_array_equal(unpatchify(patches, 8, (h // 8, w // 8)), images)
    t = torch.from_numpy(images)
    torch.testing.assert_close(patchify(t, 8), torch.from_numpy(patches))


def test_patch_layout_is_row_column_channel():
    images = np.arange(4 * 4 * 3).reshape(1, 4, 4, 3)
    first = patchify(images, 2)[0, 0]
    # first patch: pixels (0,0), (0,1), (1,0), (1,1), each with its 3 channels in order
    expected = np.concatenate([images[0, 0, 0], images[0, 0, 1], images[0, 1, 0], images[0, 1, 1]])
    np.testing.assert_array_equal(first, expected)
    second = patchify(images, 2)[0, 1]  # raster order: next patch is to the right
    np.testing.assert_array_equal(second[:3], images[0, 0, 2])


def test_patchify_rejects_sizes_not_multiple_of_patch():
    with pytest.raises(ValueError, match="not a multiple"):
        patchify(np.zeros((1, 30, 32, 3)), 16)
