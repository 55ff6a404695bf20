import torch

from jobs.training.mix import mix_batch, soft_targets


def test_soft_targets_are_smoothed_distributions():
    t = soft_targets(torch.tensor([0, 2]), 4, smoothing=0.1)
    torch.testing.assert_close(t.sum(1), torch.ones(2))
    assert t[0, 0] == torch.tensor(0.9 + 0.025) and t[0, 1] == torch.tensor(0.025)


def test_cutmix_swaps_whole_patches_and_lambda_is_the_kept_fraction():
    torch.manual_seed(0)
    x = torch.stack([torch.zeros(16, 3), torch.ones(16, 3)])  # 4x4 grid, 2 samples
    mixed, targets = mix_batch(x, torch.tensor([0, 1]), 2, (4, 4), 0.0, 1.0, 0.0)
    taken = (mixed[0, :, 0] == 1).float().mean()  # tokens sample 0 took from sample 1
    assert ((mixed == 0) | (mixed == 1)).all()  # whole tokens moved, nothing blended
    torch.testing.assert_close(targets[0], torch.stack([1 - taken, taken]))


def test_mixup_blends_inputs_and_targets_alike():
    torch.manual_seed(1)
    x = torch.stack([torch.zeros(4, 2), torch.ones(4, 2)])
    mixed, targets = mix_batch(x, torch.tensor([0, 1]), 2, (2, 2), 0.8, 0.0, 0.0)
    lam = 1 - mixed[0, 0, 0]
    torch.testing.assert_close(targets[0], torch.stack([lam, 1 - lam]))
    assert 0 < lam < 1


def test_off_by_default():
    x = torch.randn(3, 4, 2)
    mixed, targets = mix_batch(x, torch.tensor([0, 1, 2]), 3, (2, 2), 0.0, 0.0, 0.0)
    assert mixed is x and torch.equal(targets, torch.eye(3))
