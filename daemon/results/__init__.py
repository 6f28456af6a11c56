"""Results sent beside the SR: the HL7 v2 ORU^R01 for a RIS (:mod:`daemon.results.hl7`) and
the MLLP transport that carries it (:mod:`daemon.results.mllp`)."""
