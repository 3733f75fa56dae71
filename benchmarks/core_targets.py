"""Issue-2 targets: stored activations and training-step time of ft-all / ft-blocks / mobiletl.

MobileNetV3-Small, batch 8, 224x224, 10 classes, blocks=3. Stored activations come from
saved-tensor hooks (``mobiletl_edu.measure.saved_activations``); step times are the median of
many steps after warm-up, the three methods interleaved step by step so that machine noise
hits them alike. Run: ``python benchmarks/core_targets.py [--steps 30]``.

A second run adds two setups, for context rather than targets: ``mobiletl`` with
``optimize_bottom=False`` (frozen BNs not folded, default layout), to show what preparing the
frozen bottom as an inference engine buys, and ``ft-all`` trained end to end in channels_last
(model and input), which oneDNN runs faster on CPU, to show how much of the ratio depends on
the baseline's memory layout.
"""
import argparse
import platform

import torch

from mobiletl_edu.measure import saved_activations, step_times
from mobiletl_edu.methods import prepare

METHODS = {"ft-all": None, "ft-blocks": 3, "mobiletl": 3}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 10, (8,))
    setups = {m: prepare(args.model, m, b, num_classes=10) for m, b in METHODS.items()}
    stored = {m: saved_activations(s.model, x, y).total_bytes for m, s in setups.items()}
    median = step_times(setups, x, y, steps=args.steps, warmup=args.warmup)

    print(f"{args.model}, batch 8, 224x224, 10 classes; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'method':<11}{'stored MB':>10}{'median step s':>15}")
    for m in setups:
        print(f"{m:<11}{stored[m] / 1e6:>10.2f}{median[m]:>15.3f}")
    print(f"stored  mobiletl/ft-blocks = {stored['mobiletl'] / stored['ft-blocks']:.3f} (target <= 0.6)")
    print(f"stored  mobiletl/ft-all    = {stored['mobiletl'] / stored['ft-all']:.3f} (target <= 0.12)")
    print(f"speed   ft-all/mobiletl    = {median['ft-all'] / median['mobiletl']:.2f}x (target >= 2.5x)")
    print(f"slowdown mobiletl/ft-blocks = {median['mobiletl'] / median['ft-blocks'] - 1:+.1%} (target <= +5%)")

    # Context, in a second run: four setups interleaved evict more of each other's cache, so
    # its times are longer than the first run's; compare ratios within a run only.
    context = {"ft-all": setups["ft-all"], "mobiletl": setups["mobiletl"],
               "mobiletl, bottom not optimized": prepare(args.model, "mobiletl", 3, num_classes=10,
                                                         optimize_bottom=False),
               "ft-all, channels_last": prepare(args.model, "ft-all", num_classes=10)}
    context["ft-all, channels_last"].model.to(memory_format=torch.channels_last)
    median = step_times(context, x, y, steps=args.steps, warmup=args.warmup,
                        inputs_for={"ft-all, channels_last": x.contiguous(memory_format=torch.channels_last)})
    print("context (no targets; a second run, four setups interleaved):")
    for name in context:
        print(f"  {name:<32} median step {median[name]:.3f} s")
    print(f"  ft-all / mobiletl                              = {median['ft-all'] / median['mobiletl']:.2f}x")
    print(f"  ft-all / mobiletl with the bottom not optimized = "
          f"{median['ft-all'] / median['mobiletl, bottom not optimized']:.2f}x")
    print(f"  ft-all in channels_last / mobiletl             = "
          f"{median['ft-all, channels_last'] / median['mobiletl']:.2f}x")


if __name__ == "__main__":
    main()
