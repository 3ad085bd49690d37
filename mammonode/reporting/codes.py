"""Every coded concept the two SRs use, with its meaning written out.

Meanings are spelled here, not looked up in ``pydicom.sr.codedict.codes``: some of pydicom's
meanings differ from the template's (``IndividualImpressionRecommendation`` carries a zero-width
space, ``CompositeType`` reads "Composite type"), and validators compare meanings. Values come
from DICOM PS3.16 (the CID named beside each group) and PS3.16 Annex D (DCM).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code


def _dcm(value: str, meaning: str) -> Code:
    return Code(value, "DCM", meaning)


def _sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


def _ucum(value: str, meaning: str) -> Code:
    return Code(value, "UCUM", meaning)


# Units (UCUM). DICOM's CAD templates (TID 4005 row 5, TID 4006 row 7) give 111047 in percent.
PERCENT = _ucum("%", "Percent")
PIXELS = _ucum("{pixels}", "Pixels")
MILLIMETER = _ucum("mm", "millimeter")

# Measurements and their modifiers.
PROBABILITY_OF_CANCER = _dcm("111047", "Probability of cancer")  # CID 6048
DERIVATION = _dcm("121401", "Derivation")
MEAN = _sct("373098007", "Mean")  # CID 7464
COMMENT = _dcm("121106", "Comment")
FINDING = _dcm("121071", "Finding")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
IMAGING_PROCEDURE = _sct("363679005", "Imaging procedure")  # CID 100
PROCESSING_EQUIPMENT = _dcm("109102", "Processing Equipment")  # CID 7005
DEVICE = _dcm("121007", "Device")  # CID 270 observer type

# Anatomy and laterality.
BREAST = _sct("76752008", "Breast")
LATERALITY = {  # CID 244 "Laterality"
    "R": _sct("24028007", "Right"),
    "L": _sct("7771000", "Left"),
    "B": _sct("51440002", "Bilateral"),
}
BREAST_SIDE = {  # CID 6022 "Side": the Image Laterality of the CAD Image Library (TID 4020)
    "R": _sct("73056007", "Right breast"),
    "L": _sct("80248007", "Left breast"),
}
IMAGE_LATERALITY = _dcm("111027", "Image Laterality")
IMAGE_VIEW = _dcm("111031", "Image View")
VIEW = {  # CID 4014 "View for Mammography"
    "CC": _sct("399162004", "cranio-caudal"),
    "MLO": _sct("399368009", "medio-lateral oblique"),
}

# Breast composition (BI-RADS 5th edition), CID 6000 "Overall Breast Composition".
BREAST_COMPOSITION = _sct("129715009", "Breast composition")
COMPOSITION = {
    "a": _sct("129716005", "Almost entirely fat"),
    "b": _sct("129717001", "Scattered fibroglandular densities"),
    "c": _sct("129718006", "Heterogeneously dense"),
    "d": _sct("129719003", "Extremely dense"),
}

# Algorithm identification (TID 4019).
ALGORITHM_NAME = _dcm("111001", "Algorithm Name")
ALGORITHM_VERSION = _dcm("111003", "Algorithm Version")
ALGORITHM_PARAMETERS = _dcm("111002", "Algorithm Parameters")

# Mammography CAD SR (TID 4000 family).
LANGUAGE = _dcm("121049", "Language of Content Item and Descendants")
ENGLISH = Code("en", "RFC5646", "English")
MAMMOGRAPHY_CAD_REPORT = _dcm("111036", "Mammography CAD Report")
IMAGE_LIBRARY = _dcm("111028", "Image Library")
PATIENT_ORIENTATION_ROW = _dcm("111044", "Patient Orientation Row")
PATIENT_ORIENTATION_COLUMN = _dcm("111043", "Patient Orientation Column")
STUDY_DATE = _dcm("111060", "Study Date")
STUDY_TIME = _dcm("111061", "Study Time")
CONTENT_DATE = _dcm("111018", "Content Date")
CONTENT_TIME = _dcm("111019", "Content Time")
HORIZONTAL_PIXEL_SPACING = _dcm("111026", "Horizontal Pixel Spacing")
VERTICAL_PIXEL_SPACING = _dcm("111066", "Vertical Pixel Spacing")
PIXEL_DATA_ROWS = _dcm("110910", "Pixel Data Rows")
PIXEL_DATA_COLUMNS = _dcm("110911", "Pixel Data Columns")
CAD_SUMMARY = _dcm("111017", "CAD Processing and Findings Summary")
CAD_SUMMARY_VALUE = {  # CID 6047, keyed (all succeeded?, any succeeded?, with findings?)
    (True, True, True): _dcm("111242", "All algorithms succeeded; with findings"),
    (True, True, False): _dcm("111241", "All algorithms succeeded; without findings"),
    (False, True, True): _dcm("111244", "Not all algorithms succeeded; with findings"),
    (False, True, False): _dcm("111243", "Not all algorithms succeeded; without findings"),
    (False, False, False): _dcm("111245", "No algorithms succeeded; without findings"),
}
INDIVIDUAL_IMPRESSION = _dcm("111034", "Individual Impression/Recommendation")
RENDERING_INTENT = _dcm("111056", "Rendering Intent")
PRESENTATION_REQUIRED = _dcm("111150", "Presentation Required: Rendering device is expected to present")
NOT_FOR_PRESENTATION = _dcm("111152", "Not for Presentation: Rendering device expected not to present")
COMPOSITE_FEATURE = _dcm("111015", "Composite Feature")
SELECTED_REGION = _dcm("111099", "Selected region")  # CID 6014 / 6016
COMPOSITE_TYPE = _dcm("111016", "Composite Type")
RELATED_SPATIALLY = _dcm("111154", "Target content items are related spatially")  # CID 6035
SCOPE_OF_FEATURE = _dcm("111057", "Scope of Feature")
ON_MULTIPLE_IMAGES = _dcm("111158", "Feature detected on multiple images")  # CID 6036
SINGLE_IMAGE_FINDING = _dcm("111059", "Single Image Finding")
CENTER = _dcm("111010", "Center")
OUTLINE = _dcm("111041", "Outline")
SELECTED_REGION_DESCRIPTION = _dcm("111058", "Selected Region Description")
SUMMARY_OF_DETECTIONS = _dcm("111064", "Summary of Detections")
SUMMARY_OF_ANALYSES = _dcm("111065", "Summary of Analyses")
OUTCOME = {  # CID 6042 "Status of Results"
    "succeeded": _dcm("111222", "Succeeded"),
    "partially": _dcm("111223", "Partially Succeeded"),
    "failed": _dcm("111224", "Failed"),
    "not attempted": _dcm("111225", "Not Attempted"),
}
SUCCESSFUL_DETECTIONS = _dcm("111063", "Successful Detections")
FAILED_DETECTIONS = _dcm("111025", "Failed Detections")
DETECTION_PERFORMED = _dcm("111022", "Detection Performed")
SUCCESSFUL_ANALYSES = _dcm("111062", "Successful Analyses")
FAILED_ANALYSES = _dcm("111024", "Failed Analyses")
ANALYSIS_PERFORMED = _dcm("111004", "Analysis Performed")
BREAST_COMPOSITION_ANALYSIS = _sct("133890006", "Breast composition analysis")  # CID 6043
IMPRESSION_ANALYSIS = _dcm("111233", "Individual Impression / Recommendation Analysis")  # CID 6043

# Local concepts: only where no standard code exists (none for a benign-finding probability or
# for a probability per BI-RADS composition class). The scheme is declared in full in every SR
# that uses it (Coding Scheme Identification Sequence).
LOCAL_SCHEME = "99MAMMONODE"
LOCAL_SCHEME_UID = "2.25.193228551435640466171202683139611080896"  # fixed; never reissued
LOCAL_SCHEME_VERSION = "1"
P_BENIGN = Code("MN-001", LOCAL_SCHEME, "Probability of benign finding")
P_COMPOSITION = {
    c: Code(f"MN-01{i}", LOCAL_SCHEME, f"Probability of breast composition {c}") for i, c in enumerate("abcd")
}


def local_scheme() -> Dataset:
    """The Coding Scheme Identification Sequence item declaring 99MAMMONODE."""
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeUID = LOCAL_SCHEME_UID
    item.CodingSchemeVersion = LOCAL_SCHEME_VERSION
    item.CodingSchemeName = "mammonode local concepts"
    item.CodingSchemeResponsibleOrganization = "mammonode project"
    return item
