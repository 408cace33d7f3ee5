"""The digits the seeds' experiments train on (``bnbench train``; see ``bnbench.train_models``).

The handwritten digits that scikit-learn ships (``sklearn.datasets.load_digits``: 1,797 8x8
images, nothing downloaded), upsampled bilinearly to the seed's image size, ink scaled to
[0, 1], with one fixed stratified train/test split (80/20, ``random_state=0``: 1,437 / 360
images).
"""

import torch
import torch.nn.functional as F

SPLIT_SEED = 0  # random_state of the stratified train/test split
TEST_FRACTION = 0.2


def load_digits_split(image_size, train_size=None, test_size=None):
    """The digits, upsampled to `image_size`, split 80/20 stratified by class (fixed).

    Returns (x_train, y_train, x_test, y_test): float32 (n, 1, size, size) images with ink
    in [0, 1] and int64 labels.  `train_size`/`test_size` take a stratified subset of each
    part (the same one every time).
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                           align_corners=False).clamp_(0.0, 1.0)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=TEST_FRACTION,
                                           stratify=digits.target, random_state=SPLIT_SEED)

    def subset(idx, size):
        if size is None or size >= len(idx):
            return idx
        kept, _ = train_test_split(idx, train_size=size, stratify=digits.target[idx],
                                   random_state=SPLIT_SEED)
        return kept

    train_idx, test_idx = subset(train_idx, train_size), subset(test_idx, test_size)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
