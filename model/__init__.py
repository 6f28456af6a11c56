"""Pixels and the network: DICOM/PNG to model input, the Xception model, bundles, prediction.

Importing this package does not import Keras; only `network`, `bundle_io` and
`predictor` do.
"""
