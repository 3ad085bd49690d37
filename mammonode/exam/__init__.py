"""The exam's vocabulary: the four screening views, which view an instance is, and how an
image is oriented. Pure functions of DICOM headers and pixel arrays; no database, no torch."""
