"""Stage-2 method plug-ins.

``cb-ridge`` is a new procedure: ``fit(inputs)`` gets the frozen stage-1 classifier, the training
features and labels (``study.MethodInputs``) and returns the classifier's weight and bias; the
harness scores it on the selection split and the test set like every other method.

``crt-bs`` is a preset of a built-in kind: cRT (re-initialised classifier trained by SGD on the
frozen features, class-balanced sampling) with Balanced Softmax instead of cross-entropy.
"""

import torch

import study


@study.register_method("cb-ridge", label="CB ridge", description="class-balanced ridge regression on one-hot targets")
def cb_ridge(inputs: study.MethodInputs):
    """Least squares from features (with a constant) to one-hot labels, each image weighted by
    1/n_y so that every class counts the same; ridge strength = the method's weight_decay."""
    f, y = inputs.train_features, inputs.train_labels
    C = inputs.weight.shape[0]
    x = torch.cat([f, torch.ones(len(f), 1, device=f.device)], dim=1)
    counts = torch.as_tensor(inputs.counts, dtype=x.dtype, device=x.device)
    w = (1.0 / counts)[y].unsqueeze(1)
    targets = torch.nn.functional.one_hot(y, C).to(x.dtype)
    gram = x.T @ (w * x) + inputs.config.weight_decay * torch.eye(x.shape[1], device=x.device)
    solution = torch.linalg.solve(gram, x.T @ (w * targets))  # (D + 1) x C
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


study.register_method(
    "crt-bs",
    kind="trained",
    label="cRT + BS",
    description="cRT with Balanced Softmax",
    preset={"loss": "balanced-softmax", "classifier_init": "reinit", "sampler": "instance", "maxnorm": False},
)
