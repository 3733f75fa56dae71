"""Training on the device: a Raspberry Pi 4 runs the package, a Jetson Nano runs a bundle.

* ``devices``: the Pi 4, the Jetson Nano and the host as profiles (memory, software, pitfalls).
* ``bundle``: ``write_bundle`` (a prepared model, checked against the device's memory budget,
  written with the device runner) and ``import_bundle`` (back into a run folder).
* ``run``: the device runner, a single file for Python 3.6 + torch 1.10 and later.
* ``bench`` and ``latency``: the paper's Table 6 protocol, and a latency model fitted to it.
* ``stacks`` and ``apicheck``: the devices' software stacks rebuilt here for tests, and the
  static check of the runner against torch 1.10's API.
"""
