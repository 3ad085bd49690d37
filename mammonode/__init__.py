"""mammonode: a DICOM-native AI node for screening mammography."""

__version__ = "0.1.0"
