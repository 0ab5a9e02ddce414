"""ichvol: intracerebral hemorrhage volume on head CT with DR-UNet. Research use only, not for clinical use."""

__version__ = "0.1.0"
