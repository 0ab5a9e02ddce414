"""What every output and command says about itself: research use only, not for clinical use.

One string, shown by the command line, written into the DICOM objects (SEG content
description, SR comment, secondary capture), the overlay, the trend tables and the reports.
"""

from __future__ import annotations

DISCLAIMER = "Research use only, not for clinical use."
