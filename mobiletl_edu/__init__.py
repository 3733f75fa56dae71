"""mobiletl-edu: MobileTL (Chiang et al., AAAI 2023) memory-efficient transfer learning."""
__version__ = "0.1.0"
