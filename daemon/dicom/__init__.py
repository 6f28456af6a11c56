"""DICOM networking: the Storage SCP (receiver, transport guard, access, eligibility, statuses,
header sanitising) and the Storage SCU that delivers results (sender)."""
