"""One training step of a bundle's runner on a given batch, run on a device stack (Python 3.6+).

    python device_step.py BUNDLE BATCH.safetensors OUT.safetensors

Writes the loss (metadata), every trainable tensor's gradient and its value after one Adam
step, for tests/test_deploy_device.py to compare with the package's step on the host.
"""
import sys

import torch
import torch.nn.functional as F

bundle_dir, batch_file, out_file = sys.argv[1:4]
sys.path.insert(0, bundle_dir)
import run  # noqa: E402  (the bundle's own runner)

torch.set_num_threads(1)
bundle = run.Bundle(bundle_dir)
with open(batch_file, "rb") as f:
    batch = run.parse_tensors(f.read(), batch_file)[0]
network = bundle.network
network.train()
optimizer = run.make_optimizer(network, 1e-3)
torch.manual_seed(1)  # dropout
optimizer.zero_grad()
loss = F.cross_entropy(network(batch["inputs"]), batch["targets"])
loss.backward()
result = dict(("grad." + n, p.grad) for n, p in network.named_parameters() if p.requires_grad)
optimizer.step()
result.update(("param." + n, p.detach()) for n, p in network.named_parameters() if p.requires_grad)
run.atomic_write(out_file, run.tensors_bytes(result, {"loss": repr(loss.item()), "torch": torch.__version__,
                                                      "python": sys.version.split()[0]}))
